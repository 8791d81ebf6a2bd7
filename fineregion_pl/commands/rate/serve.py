"""``fineregion-pl rate serve``: the rating page of a study, for several raters at once."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Optional

from fineregion_pl.commands.rate.store import Study
from fineregion_pl.model.errors import BadInputError

INSTALL_HINT = 'the rating page needs its extra: pip install -e ".[rate]"'


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def serve(study: str, host: str = "127.0.0.1", port: int = 7860, raters: Optional[list[str]] = None, reissue: bool = False, title: str = "Rate region captions") -> None:
    """Serve the rating page of a study: raters log in with their name and token and rate captions.

    Each rater sees the region drawn on its image and one caption at a time, rates accuracy,
    relevance and fluency from 1 (poor) to 5 (excellent) (keys 1-5, Enter saves), and can skip a
    region with a reason. Every rating is committed to the study file before the page says it is
    saved; a rater who comes back (or after a restart of the server) continues where they stopped.

    Args:
        study: the study file (``rate prepare --study``).
        host: address to listen on; loopback by default. Another address opens the page to the
            network over plain HTTP (names and tokens unencrypted): use it only on a trusted network.
        port: port to listen on.
        raters: rater names to add (a token is made and printed for each new name).
        reissue: make new tokens for the ``raters`` named who already exist (their old tokens stop working).
        title: the page's title.
    """
    opened = Study(study)
    tokens = opened.add_raters(raters or [], reissue=reissue)
    names = opened.raters()
    if not names:
        raise BadInputError(f"{opened.path} has no raters yet: add them with --raters '[alice, bob]' (each gets a token to log in with)")
    if not _port_free(host, port):
        raise BadInputError(f"cannot listen on {host}:{port}: the port is in use or the address is not this machine's; choose another --port")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from fineregion_pl.commands.rate.page import build_page, launch_options
    except ImportError as err:
        raise BadInputError(f"{INSTALL_HINT} ({err})") from None
    try:
        page = build_page(opened, title)
    except ImportError as err:
        raise BadInputError(f"{INSTALL_HINT} ({err})") from None

    for name, token in tokens.items():
        print(f"rater {name}: token {token}   (printed once)", flush=True)
    print(f"raters: {', '.join(f'{n} ({opened.progress(n).rated} rated)' for n in names)}", flush=True)
    if not _is_loopback(host):
        print(f"fineregion-pl: warning: listening on {host}: the page is open to the network over plain HTTP", flush=True)
    print(f"rating page: http://{host}:{port}  (log in with a rater name and its token; Ctrl+C stops the server, ratings are already saved)", flush=True)
    page.queue(default_concurrency_limit=None)
    page.launch(server_name=host, server_port=port, quiet=True, **launch_options(opened))
