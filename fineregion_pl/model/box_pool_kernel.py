"""Box pooling on the CPU by a compiled loop over the cells each box touches.

The soft-coverage masked mean of a box (:func:`~fineregion_pl.model.region_masks.box_masks`,
:func:`~fineregion_pl.model.region_masks.masked_mean`) weights cell ``(y, x)`` by
``cover_y(y) * cover_x(x)``, which is zero outside the box's rows and columns. The dense path
multiplies every region's full ``h w`` mask with the features (``2 N h w d`` FLOPs per image); a box
covering a share ``a`` of the image needs only ``a h w d`` multiply-adds, and no mask is built.
Per-region loops in torch pay tens of microseconds of dispatch per region and level, so the loop
is C++: threads over images (ATen's ``parallel_for``); within an image, feature rows outer and the
boxes covering each row inner, so a row is read from memory once; 64 channels at a time summed in
registers. Backward scatters the same weights into the features' gradient the same way (no two
threads write one image).

The same weights as the dense path (float32 products of the same coverages) and the same
normalisation rule (a region whose coverage sums to less than the dtype's ``tiny`` pools to zeros);
only the summation order differs (tests: within 1e-5 of the dense path, gradients included).

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and
ninja, as DeepSpeed builds its ops; ~25 s once, cached in torch's extensions folder). Where that is
impossible (no compiler) :func:`available` is false, with one warning naming the reason, and the
model keeps the dense path. ``FINEREGION_BOX_KERNEL=0`` switches the kernel off.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace {

// axis_coverage (region_masks.py): the fraction of each of `cells` equal cells along [0, extent]
// that [lo, hi] covers; NaN ends cover nothing. Also returns the non-zero range [first, last).
template <typename T>
std::pair<int64_t, int64_t> coverage(double lo, double hi, int64_t cells, double extent, T* out) {
  const double step = extent / cells;
  int64_t first = cells, last = 0;
  for (int64_t i = 0; i < cells; ++i) {
    double overlap = std::min(hi, (i + 1) * step) - std::max(lo, i * step);
    if (std::isnan(lo) || std::isnan(hi) || std::isnan(overlap)) overlap = 0.0;
    const T c = static_cast<T>(std::min(1.0, std::max(0.0, overlap / step)));
    out[i] = c;
    if (c > T(0)) { first = std::min(first, i); last = i + 1; }
  }
  return first < last ? std::make_pair(first, last) : std::make_pair<int64_t, int64_t>(0, 0);
}

// One image's regions on one level: coverages, non-zero spans and the normalisation (1 / the mask's
// sum, 0 for an empty mask: masked_mean's rule).
template <typename T>
struct Regions {
  int64_t n, h, w;
  std::vector<T> cy, cx, scale;
  std::vector<std::pair<int64_t, int64_t>> ys, xs;
  Regions(const double* boxes, int64_t n, int64_t h, int64_t w, double height, double width)
      : n(n), h(h), w(w), cy(n * h), cx(n * w), scale(n), ys(n), xs(n) {
    for (int64_t r = 0; r < n; ++r) {
      const double* box = boxes + 4 * r;
      ys[r] = coverage(box[1], box[3], h, height, cy.data() + r * h);
      xs[r] = coverage(box[0], box[2], w, width, cx.data() + r * w);
      T sy = 0, sx = 0;
      for (int64_t i = 0; i < h; ++i) sy += cy[r * h + i];
      for (int64_t i = 0; i < w; ++i) sx += cx[r * w + i];
      const T total = sy * sx;
      scale[r] = total >= std::numeric_limits<T>::min() ? T(1) / total : T(0);
      if (scale[r] == T(0)) ys[r] = {0, 0};
    }
  }
};

// o += sum over x in [x0, x1) of (wy * rx[x]) * row[x, :]; the channels in blocks of BLOCK whose
// running sums stay in registers over the x loop (one load and store of o per block and row, not per cell)
constexpr int64_t BLOCK = 64;

template <typename T>
inline void add_row_span(const T* row, T wy, const T* rx, int64_t x0, int64_t x1, int64_t d, T* o) {
  int64_t c0 = 0;
  for (; c0 + BLOCK <= d; c0 += BLOCK) {
    T acc[BLOCK] = {};
    for (int64_t x = x0; x < x1; ++x) {
      const T wxy = wy * rx[x];  // the dense mask's value, cover_y * cover_x
      const T* cell = row + x * d + c0;
#pragma omp simd
      for (int64_t c = 0; c < BLOCK; ++c) acc[c] += wxy * cell[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < BLOCK; ++c) o[c0 + c] += acc[c];
  }
  for (int64_t x = x0; x < x1; ++x) {
    const T wxy = wy * rx[x];
    const T* cell = row + x * d;
    for (int64_t c = c0; c < d; ++c) o[c] += wxy * cell[c];
  }
}

// Rows outer, regions inner: a feature row is read from memory once and then served from cache to
// every region that covers it (regions one after the other would each read their own cells, ~2x the
// features' bytes at 32 boxes of 7% of the image). One thread per image: its output rows (forward)
// or its gradient maps (backward) are written by no other thread.
// rows at least this big are prefetched while the row before them is summed (it paid off only there:
// 7.1 vs 7.5 ms at Osprey's levels, rows of 74 KB; 1.14 vs 1.02 ms at rows of 48 KB)
constexpr int64_t PREFETCH_ROW_BYTES = 64 * 1024;

template <typename T>
void forward_image(const T* f, const Regions<T>& g, int64_t d, T* out, int64_t out_stride) {
  for (int64_t r = 0; r < g.n; ++r) std::fill(out + r * out_stride, out + r * out_stride + d, T(0));
  const int64_t row_values = g.w * d;
  for (int64_t y = 0; y < g.h; ++y) {
    const T* row = f + y * row_values;
    if (y + 1 < g.h && row_values * static_cast<int64_t>(sizeof(T)) >= PREFETCH_ROW_BYTES) {
      const char* next = reinterpret_cast<const char*>(row + row_values);
      for (int64_t byte = 0; byte < row_values * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(next + byte, 0, 1);
    }
    for (int64_t r = 0; r < g.n; ++r) {
      if (y < g.ys[r].first || y >= g.ys[r].second) continue;
      add_row_span(row, g.cy[r * g.h + y], g.cx.data() + r * g.w, g.xs[r].first, g.xs[r].second, d, out + r * out_stride);
    }
  }
  for (int64_t r = 0; r < g.n; ++r) {
    T* o = out + r * out_stride;
    const T s = g.scale[r];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] *= s;
  }
}

template <typename T>
void backward_image(const T* grad, int64_t grad_stride, const Regions<T>& g, int64_t d, T* gf) {
  for (int64_t y = 0; y < g.h; ++y) {
    T* row = gf + y * g.w * d;
    for (int64_t r = 0; r < g.n; ++r) {
      if (y < g.ys[r].first || y >= g.ys[r].second) continue;
      const T wy = g.cy[r * g.h + y] * g.scale[r];
      const T* go = grad + r * grad_stride;
      const T* rx = g.cx.data() + r * g.w;
      for (int64_t x = g.xs[r].first; x < g.xs[r].second; ++x) {
        const T k = wy * rx[x];
        T* cell = row + x * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) cell[c] += k * go[c];
      }
    }
  }
}

// fn(b, level, h, w, d, offset) for every image (threads over images) and level of the (B, h, w, d)
// maps, offset being the level's first channel in the concatenated (B, N, sum d)
template <typename Fn>
void each_image_and_level(int64_t B, const std::vector<torch::Tensor>& maps, const Fn& fn) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t offset = 0;
      for (size_t level = 0; level < maps.size(); ++level) {
        const auto& m = maps[level];
        fn(b, level, m.size(1), m.size(2), m.size(3), offset);
        offset += m.size(3);
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// cells under the boxes (rows times columns each box overlaps), weighted by channels and summed over
// levels, as a share of the dense matmul's N h w cells: the cost rule of box_pool
double touched_share(const std::vector<torch::Tensor>& features, const double* bx, int64_t B, int64_t N, double height, double width) {
  double touched = 0, dense = 0;
  auto cells = [](double lo, double hi, int64_t n, double extent) -> double {
    if (std::isnan(lo) || std::isnan(hi) || hi <= lo) return 1.0;  // pools to zeros, still visited
    const double step = extent / n;
    const double first = std::max(0.0, std::floor(lo / step)), last = std::min<double>(n, std::ceil(hi / step));
    return std::max(1.0, last - first);
  };
  for (auto& f : features) {
    const int64_t h = f.size(1), w = f.size(2), d = f.size(3);
    for (int64_t i = 0; i < B * N; ++i) touched += cells(bx[4 * i + 1], bx[4 * i + 3], h, height) * cells(bx[4 * i], bx[4 * i + 2], w, width) * d;
    dense += static_cast<double>(B * N) * h * w * d;
  }
  return dense > 0 ? touched / dense : 0.0;
}

// every level's (B, h, w, d) map pooled under every (B, N, 4) xyxy box into one (B, N, sum d); an
// empty tensor instead when the boxes touch more than max_share of the cells (the dense matmul is cheaper)
torch::Tensor box_pool_forward(std::vector<torch::Tensor> features, torch::Tensor boxes_in, double height, double width, double max_share) {
  TORCH_CHECK(boxes_in.device().is_cpu(), "boxes must be on the CPU");
  auto boxes = boxes_in.to(torch::kFloat64).contiguous();
  const int64_t B = boxes.size(0), N = boxes.size(1);
  const double* bx = boxes.data_ptr<double>();
  for (auto& f : features) check(f, "features");
  if (touched_share(features, bx, B, N, height, width) > max_share) return torch::empty({0}, features[0].options());
  int64_t total = 0;
  for (auto& f : features) total += f.size(3);
  auto out = torch::empty({B, N, total}, features[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "box_pool_forward", [&] {
    each_image_and_level(B, features, [&](int64_t b, size_t level, int64_t h, int64_t w, int64_t d, int64_t offset) {
      Regions<scalar_t> g(bx + b * N * 4, N, h, w, height, width);
      forward_image<scalar_t>(features[level].data_ptr<scalar_t>() + b * h * w * d, g, d, out.data_ptr<scalar_t>() + b * N * total + offset, total);
    });
  });
  return out;
}

// the gradient of every level's map from the (B, N, sum d) gradient of the output
std::vector<torch::Tensor> box_pool_backward(torch::Tensor grad, torch::Tensor boxes_in, double height, double width, std::vector<int64_t> sizes) {
  check(grad, "grad");
  TORCH_CHECK(boxes_in.device().is_cpu(), "boxes must be on the CPU");
  auto boxes = boxes_in.to(torch::kFloat64).contiguous();
  const int64_t B = grad.size(0), N = grad.size(1), total = grad.size(2);
  std::vector<torch::Tensor> out;
  for (size_t l = 0; l + 2 < sizes.size(); l += 3) out.push_back(torch::zeros({B, sizes[l], sizes[l + 1], sizes[l + 2]}, grad.options()));
  const double* bx = boxes.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "box_pool_backward", [&] {
    each_image_and_level(B, out, [&](int64_t b, size_t level, int64_t h, int64_t w, int64_t d, int64_t offset) {
      Regions<scalar_t> g(bx + b * N * 4, N, h, w, height, width);
      backward_image<scalar_t>(grad.data_ptr<scalar_t>() + b * N * total + offset, total, g, d, out[level].data_ptr<scalar_t>() + b * h * w * d);
    });
  });
  return out;
}
"""

ENV_SWITCH = "FINEREGION_BOX_KERNEL"
BUILD_NAME = "fineregion_box_pool_v9"  # change with the source: torch caches builds by name and hash
KERNEL_MAX_TOUCHED_SHARE = 0.35
"""The kernel pools the levels when the cells under the boxes (each box's rows times columns, edges
included) are at most this share of the dense matmul's ``N h w`` cells, summed over levels weighted by
channels: per touched cell the loop costs about 2x the matmul's per-cell work (whole-image boxes:
3.3 vs 1.6 ms at 24x24x512 + 12x12x1024, 27 vs 14 ms at Osprey's levels, B=8, N=32)."""


@functools.cache
def _extension():
    """The compiled extension, or ``None`` (with one warning) when it cannot be built here."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "No CUDA runtime is found" on every CPU machine
    try:
        from torch.utils.cpp_extension import load_inline

        # 512-bit vectors where the CPU has them (gcc prefers 256 by default): 6.4 vs 7.1 ms at Osprey's levels, same output
        flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-funroll-loops", "-fopenmp"]
        print(f"fineregion-pl: loading the CPU box-pooling kernel ({BUILD_NAME}; compiled once per machine, ~25 s)", file=sys.stderr)
        return load_inline(name=BUILD_NAME, cpp_sources=[_SOURCE], functions=["box_pool_forward", "box_pool_backward"],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, an unsupported platform: the dense path stays
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        warnings.warn(f"box pooling kernel not built ({type(err).__name__}: {first}); pooling boxes by the dense matmul", stacklevel=2)
        return None
    finally:
        logger.setLevel(level)


def available() -> bool:
    """Whether the compiled box-pooling loop can run here (it builds on the first call)."""
    return _extension() is not None


def kernel_applies(features: Sequence[Tensor]) -> bool:
    """Whether these ``(B, h, w, d)`` levels can be pooled by the kernel: CPU maps of one float dtype
    (float32/float64), and the kernel builds here."""
    dtypes = {f.dtype for f in features}
    return (len(features) > 0 and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64} and all(f.device.type == "cpu" for f in features)
            and available())


def box_pool(features: Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int], max_touched_share: float = KERNEL_MAX_TOUCHED_SHARE) -> Optional[Tensor]:
    """``masked_mean(f, box_masks(boxes, image_size, f.shape[1:3]))`` of every level, concatenated,
    by the compiled loop: ``(B, N, sum d)``; ``None`` where the dense path should pool instead.

    ``None`` when the kernel does not apply (:func:`kernel_applies`), there are no boxes, or the
    boxes touch more than ``max_touched_share`` of the dense matmul's cells (each box's rows times
    columns, summed over levels weighted by channels: :data:`KERNEL_MAX_TOUCHED_SHARE`). The rule and
    the pooling are one C++ call: this runs once per forward, and each torch op in Python around it
    showed in the timings (features fresh from memory: ~0.1 ms per op).

    Args:
        features: per level ``(B, h, w, d)`` channels-last CPU float maps (made contiguous if not).
        boxes: ``(B, N, 4)`` xyxy pixels of the model input.
        image_size: ``(H, W)`` of the model input.
        max_touched_share: the cost rule's threshold (``inf``: always the kernel).

    Differentiable in ``features`` (boxes get no gradient, as in the dense path, whose masks are data).
    """
    if boxes.shape[1] == 0 or not kernel_applies(features):
        return None
    height, width = float(image_size[0]), float(image_size[1])
    features = [f.contiguous() for f in features]
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        z = _BoxPool.apply(boxes.detach(), height, width, max_touched_share, *features)
    else:
        z = _extension().box_pool_forward(features, boxes.detach(), height, width, max_touched_share)
    return None if z.dim() == 1 else z


class _BoxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, boxes: Tensor, height: float, width: float, max_touched_share: float, *features: Tensor) -> Tensor:
        ctx.save_for_backward(boxes)
        ctx.size = (height, width)
        ctx.shapes = [s for f in features for s in f.shape[1:]]
        return _extension().box_pool_forward(list(features), boxes, height, width, max_touched_share)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (boxes,) = ctx.saved_tensors
        grads = _extension().box_pool_backward(grad.contiguous(), boxes, *ctx.size, ctx.shapes)
        return (None, None, None, None, *grads)
