"""The YAML recipes, shipped inside the package as ``fineregion_pl.recipes`` (see pyproject.toml)."""
