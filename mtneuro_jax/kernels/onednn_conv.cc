// oneDNN convolutions for XLA:CPU, exposed as XLA FFI handlers (mtneuro_jax/kernels/onednn.py).
//
// Why: XLA:CPU's convolutions, above all its weight-gradient ("backward filter") conv, reach a
// third to a half of what oneDNN (PyTorch's CPU backend) reaches on the ResNet/U-Net shapes
// (docs/speed.md). These three handlers run the same float32 maths through oneDNN:
//
//   MtnOnednnConvFwd          y  = conv(x, w)            x [N, *S, C] (NHWC / NDHWC)
//   MtnOnednnConvBwdData      dx = d conv / d x  (dy, w)  w [*K, C, O] (HWIO / DHWIO)
//   MtnOnednnConvBwdWeights   dw = d conv / d w  (x, dy)  y, dy [N, *S', O]
//
// for 2 or 3 spatial dims, any strides, explicit non-negative low/high padding, no dilation,
// one feature group. Shapes come from the buffers; attributes: strides, pad_lo, pad_hi (int64
// arrays, one entry per spatial dim). Activations stay in XLA's row-major NHWC buffers (no
// activation reorders); weights are reordered to and from the blocked layout oneDNN picks.
// Primitives are created once per (pass, shapes, strides, padding) and cached: creation costs
// milliseconds, execution reuses them. Scratchpads are per call (user mode), so concurrent
// calls from XLA's thread pool are safe. Threads: oneDNN's OpenMP runtime, a team per
// calling thread (see onednn.py for the interaction with XLA's pool).

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#if DNNL_VERSION_MAJOR != 2
#error "onednn_conv.cc is written against the oneDNN 2.x API (Debian libdnnl-dev 2.6)"
#endif

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;
using Tag = memory::format_tag;

enum Pass : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One convolution problem in oneDNN's logical (N, C, spatial...) order.
struct Problem {
  int64_t pass;
  Dims src, wei, dst, strides, pad_lo, pad_hi;

  std::vector<int64_t> Key() const {
    std::vector<int64_t> k{pass};
    for (const Dims* d : {&src, &wei, &dst, &strides, &pad_lo, &pad_hi}) {
      k.push_back(static_cast<int64_t>(d->size()));
      k.insert(k.end(), d->begin(), d->end());
    }
    return k;
  }
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

// A cached primitive and the weight reorder it needs (weights user <-> oneDNN layout).
struct Entry {
  dnnl::primitive prim;
  memory::desc user_src, user_wei, user_dst;  // XLA's row-major buffers
  memory::desc prim_wei;                      // weights (or weight gradient) as oneDNN wants
  memory::desc scratch;
  bool reorder_wei = false;
  dnnl::primitive wei_reorder;  // user -> prim (fwd, bwd-data) or prim -> user (bwd-weights)
};

Tag ActTag(size_t rank) { return rank == 5 ? Tag::ndhwc : Tag::nhwc; }
Tag WeiTag(size_t rank) { return rank == 5 ? Tag::dhwio : Tag::hwio; }

std::unique_ptr<Entry> Build(const Problem& p) {
  auto& eng = Engine();
  auto e = std::make_unique<Entry>();
  const auto f32 = memory::data_type::f32;
  e->user_src = memory::desc(p.src, f32, ActTag(p.src.size()));
  e->user_wei = memory::desc(p.wei, f32, WeiTag(p.wei.size()));
  e->user_dst = memory::desc(p.dst, f32, ActTag(p.dst.size()));
  const memory::desc any_wei(p.wei, f32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  // The forward descriptor: the primitive itself for kFwd, the hint for the backward passes.
  dnnl::convolution_forward::desc fwd_d(
    p.pass == kFwd ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training,
    dnnl::algorithm::convolution_direct, e->user_src, any_wei, e->user_dst, p.strides, p.pad_lo,
    p.pad_hi);
  dnnl::convolution_forward::primitive_desc fwd_pd(fwd_d, attr, eng);

  if (p.pass == kFwd) {
    e->prim = dnnl::convolution_forward(fwd_pd);
    e->prim_wei = fwd_pd.weights_desc();
    e->scratch = fwd_pd.scratchpad_desc();
  } else if (p.pass == kBwdData) {
    dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, e->user_src,
                                            any_wei, e->user_dst, p.strides, p.pad_lo, p.pad_hi);
    dnnl::convolution_backward_data::primitive_desc pd(d, attr, eng, fwd_pd);
    e->prim = dnnl::convolution_backward_data(pd);
    e->prim_wei = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, e->user_src,
                                               any_wei, e->user_dst, p.strides, p.pad_lo,
                                               p.pad_hi);
    dnnl::convolution_backward_weights::primitive_desc pd(d, attr, eng, fwd_pd);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->prim_wei = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  e->reorder_wei = e->prim_wei != e->user_wei;
  if (e->reorder_wei) {
    e->wei_reorder = p.pass == kBwdWeights
                       ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->prim_wei, eng,
                                                                     e->user_wei))
                       : dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->user_wei, eng,
                                                                     e->prim_wei));
  }
  return e;
}

const Entry& Lookup(const Problem& p) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<std::vector<int64_t>, std::unique_ptr<Entry>,
                                              KeyHash>();
  std::vector<int64_t> key = p.Key();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it == cache->end()) it = cache->emplace(key, Build(p)).first;
  return *it->second;
}

// XLA's [N, *S, C] -> oneDNN's logical [N, C, *S].
Dims ActDims(ffi::Span<const int64_t> d) {
  Dims out{d[0], d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) out.push_back(d[i]);
  return out;
}

// XLA's [*K, I, O] -> oneDNN's logical [O, I, *K].
Dims WeiDims(ffi::Span<const int64_t> d) {
  const size_t r = d.size();
  Dims out{d[r - 1], d[r - 2]};
  for (size_t i = 0; i + 2 < r; ++i) out.push_back(d[i]);
  return out;
}

Dims ToDims(ffi::Span<const int64_t> s) { return Dims(s.begin(), s.end()); }

ffi::Error Check(const Problem& p) {
  const size_t rank = p.src.size();
  if ((rank != 4 && rank != 5) || p.wei.size() != rank || p.dst.size() != rank ||
      p.strides.size() != rank - 2 || p.pad_lo.size() != rank - 2 ||
      p.pad_hi.size() != rank - 2) {
    return ffi::Error::InvalidArgument(
      "onednn_conv: operands must be rank 4 or 5 with one stride/pad entry per spatial dim");
  }
  return ffi::Error::Success();
}

// A growing 64-byte-aligned buffer per thread and purpose: the scratchpad and the reordered
// weights are reused across calls instead of allocated (and page-faulted in) every time.
void* ThreadBuffer(int slot, size_t bytes) {
  struct Buf {
    std::unique_ptr<char[]> data;
    size_t size = 0;
  };
  thread_local Buf bufs[2];
  Buf& b = bufs[slot];
  if (b.size < bytes) {
    b.data.reset(new char[bytes + 64]);
    b.size = bytes;
  }
  const auto p = reinterpret_cast<uintptr_t>(b.data.get());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}

// Runs pass p on raw pointers: src/wei/dst are XLA's buffers (inputs or the result).
ffi::Error Run(const Problem& p, void* src, void* wei, void* dst) {
  if (auto err = Check(p); err.failure()) return err;
  try {
    const Entry& e = Lookup(p);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory src_m(e.user_src, eng, src), dst_m(e.user_dst, eng, dst);
    memory user_wei_m(e.user_wei, eng, wei);
    memory wei_m = e.reorder_wei
                     ? memory(e.prim_wei, eng, ThreadBuffer(0, e.prim_wei.get_size()))
                     : user_wei_m;
    memory scratch_m(e.scratch, eng, ThreadBuffer(1, e.scratch.get_size()));
    if (e.reorder_wei && p.pass != kBwdWeights) {
      e.wei_reorder.execute(stream, {{DNNL_ARG_FROM, user_wei_m}, {DNNL_ARG_TO, wei_m}});
    }
    if (p.pass == kFwd) {
      e.prim.execute(stream, {{DNNL_ARG_SRC, src_m},
                              {DNNL_ARG_WEIGHTS, wei_m},
                              {DNNL_ARG_DST, dst_m},
                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (p.pass == kBwdData) {
      e.prim.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m},
                              {DNNL_ARG_WEIGHTS, wei_m},
                              {DNNL_ARG_DIFF_DST, dst_m},
                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      e.prim.execute(stream, {{DNNL_ARG_SRC, src_m},
                              {DNNL_ARG_DIFF_WEIGHTS, wei_m},
                              {DNNL_ARG_DIFF_DST, dst_m},
                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
      if (e.reorder_wei) {
        e.wei_reorder.execute(stream, {{DNNL_ARG_FROM, wei_m}, {DNNL_ARG_TO, user_wei_m}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN error: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  Problem p{kFwd,          ActDims(x.dimensions()), WeiDims(w.dimensions()),
            ActDims(y->dimensions()), ToDims(strides), ToDims(pad_lo), ToDims(pad_hi)};
  return Run(p, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error ConvBwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  Problem p{kBwdData,       ActDims(dx->dimensions()), WeiDims(w.dimensions()),
            ActDims(dy.dimensions()), ToDims(strides), ToDims(pad_lo), ToDims(pad_hi)};
  return Run(p, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error ConvBwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  Problem p{kBwdWeights,    ActDims(x.dimensions()), WeiDims(dw->dimensions()),
            ActDims(dy.dimensions()), ToDims(strides), ToDims(pad_lo), ToDims(pad_hi)};
  return Run(p, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

}  // namespace

#define MTN_CONV_BINDING()                          \
  ffi::Ffi::Bind()                                  \
    .Arg<ffi::Buffer<ffi::F32>>()                   \
    .Arg<ffi::Buffer<ffi::F32>>()                   \
    .Ret<ffi::Buffer<ffi::F32>>()                   \
    .Attr<ffi::Span<const int64_t>>("strides")      \
    .Attr<ffi::Span<const int64_t>>("pad_lo")       \
    .Attr<ffi::Span<const int64_t>>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtnOnednnConvFwd, ConvFwd, MTN_CONV_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MtnOnednnConvBwdData, ConvBwdData, MTN_CONV_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MtnOnednnConvBwdWeights, ConvBwdWeights,
                              MTN_CONV_BINDING());

// The library's version, for onednn.py's report (e.g. 20603 for 2.6.3).
extern "C" int MtnOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
