"""oneDNN convolutions for XLA:CPU as XLA FFI custom calls (optional; ``conv_backend='onednn'``).

Why: XLA:CPU's convolutions, its weight gradient above all, reach a third to a half of what
oneDNN (PyTorch's CPU backend) reaches on our ResNet / U-Net shapes (docs/speed.md). This
module builds ``onednn_conv.cc`` against the system's oneDNN 2.x (Debian: ``apt-get install
libdnnl-dev g++``) into a per-user cache, registers its three handlers with XLA, and offers
``conv_general_dilated``: ``lax.conv_general_dilated``'s signature, a ``jax.custom_vjp`` whose
forward, input gradient and weight gradient are oneDNN calls for the cases it supports
(float32, NHWC/HWIO or NDHWC/DHWIO, any stride, explicit non-negative padding, no dilation,
one feature group) and ``fallback`` (XLA's conv by default) for every other case.

Nothing else in the project needs this: models never import it; ``train/step.py`` does, only
when ``conv_backend='onednn'``.

Build: on first use (``available()``), or explicitly with
``python -m mtneuro_jax.kernels.onednn build`` (``scripts/build_onednn.sh`` also installs the
package). The .so goes to ``$MTNEURO_KERNEL_CACHE`` or ``~/.cache/mtneuro_jax/kernels/<hash>/``,
the hash covering the source, the jax/jaxlib versions and the compile command. oneDNN outside
the system paths: set ``DNNL_ROOT`` (with include/ and lib/).

Threads: oneDNN (Debian's OpenMP build) runs each call on an OpenMP team of
``OMP_NUM_THREADS`` (default: all cores) started from the XLA thread that runs the custom
call. XLA's own pool (also one thread per core) is idle while a conv runs in the common
sequential case; when XLA runs independent ops concurrently (its thunk executor) the two
pools oversubscribe the cores. ``OMP_WAIT_POLICY=passive`` stops OpenMP's threads spinning
after each call (see docs/speed.md for what it did here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = {
  "fwd": ("mtneuro_onednn_conv_fwd", "MtnOnednnConvFwd"),
  "bwd_data": ("mtneuro_onednn_conv_bwd_data", "MtnOnednnConvBwdData"),
  "bwd_weights": ("mtneuro_onednn_conv_bwd_weights", "MtnOnednnConvBwdWeights"),
}
INSTALL_HINT = (
  "install oneDNN and a C++ compiler (Debian/Ubuntu: `apt-get install libdnnl-dev g++`, or "
  "`bash scripts/build_onednn.sh`), then build with `python -m mtneuro_jax.kernels.onednn build`"
)
_HEADER = Path("oneapi") / "dnnl" / "dnnl.hpp"

_lock = threading.Lock()
_state: dict = {}  # 'lib', 'path', 'error', 'version' once _load() ran


def _dnnl_root() -> Path | None:
  root = os.environ.get("DNNL_ROOT", "")
  return Path(root) if root else None


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _header_dir() -> Path | None:
  """The include dir holding oneapi/dnnl/dnnl.hpp (DNNL_ROOT, the venv, /usr/local, /usr)."""
  candidates = []
  if _dnnl_root():
    candidates.append(_dnnl_root() / "include")
  candidates += [Path(sys.prefix) / "include", Path("/usr/local/include"), Path("/usr/include")]
  for d in candidates:
    if (d / _HEADER).is_file():
      return d
  return None


def _lib_dir() -> Path | None:
  """DNNL_ROOT/lib(64) when set and holding libdnnl, else None (the linker's default paths)."""
  root = _dnnl_root()
  if root:
    for sub in ("lib", "lib64"):
      if any((root / sub).glob("libdnnl.so*")):
        return root / sub
  return None


def _compile_command(out: Path) -> list[str]:
  cmd = [
    _compiler() or "g++",
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-Wno-attributes",
    "-Wno-return-type",
    f"-I{jax.ffi.include_dir()}",
  ]
  hdr = _header_dir()
  if hdr and hdr != Path("/usr/include"):
    cmd.append(f"-I{hdr}")
  cmd += [str(SOURCE), "-o", str(out)]
  lib = _lib_dir()
  if lib:
    cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
  return cmd + ["-ldnnl"]


def cache_dir() -> Path:
  """Where the built .so lives: ``$MTNEURO_KERNEL_CACHE`` or ``~/.cache/mtneuro_jax/kernels/<hash>``."""
  import jaxlib

  h = hashlib.sha256(SOURCE.read_bytes())
  h.update(f"jax={jax.__version__} jaxlib={jaxlib.__version__}".encode())
  h.update(" ".join(_compile_command(Path("x"))).replace(str(SOURCE), SOURCE.name).encode())
  base = os.environ.get("MTNEURO_KERNEL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtneuro_jax", "kernels"
  )
  return Path(base) / h.hexdigest()[:16]


def missing() -> str | None:
  """Why the kernel cannot be built here (None if compiler, headers and library are present)."""
  if not _compiler():
    return "no C++ compiler (g++ / c++ / $CXX) on PATH"
  if not _header_dir():
    return "oneDNN headers (oneapi/dnnl/dnnl.hpp) not found"
  if not (_lib_dir() or ctypes.util.find_library("dnnl")):
    return "libdnnl.so not found"
  return None


def build(force: bool = False, verbose: bool = False) -> Path:
  """Compiles onednn_conv.cc into ``cache_dir()`` (if not there yet) and returns the .so path.

  Raises RuntimeError with the compiler's message when the build fails. Safe to run from
  several processes at once (each compiles to a temporary file and renames it into place).
  """
  out = cache_dir() / "onednn_conv.so"
  if out.is_file() and not force:
    return out
  why = missing()
  if why:
    raise RuntimeError(f"cannot build the oneDNN conv kernel: {why}")
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = _compile_command(Path(tmp))
  if verbose:
    print(" ".join(cmd), flush=True)
  # Compiler output on failure: the caller's message carries its last lines.
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(
      f"building the oneDNN conv kernel failed (status {proc.returncode} from {cmd[0]}; "
      f"rerun `python -m mtneuro_jax.kernels.onednn build` to see the command):\n{tail}"
    )
  os.replace(tmp, out)
  return out


def _load() -> dict:
  """Builds (if needed), loads and registers the kernel once per process; records any error."""
  with _lock:
    if _state:
      return _state
    try:
      path = build()
      lib = ctypes.cdll.LoadLibrary(str(path))
      for name, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
      _state.update(lib=lib, path=path, error=None, version=int(lib.MtnOnednnVersion()))
    except (RuntimeError, OSError, AttributeError) as e:
      _state.update(lib=None, path=None, error=str(e), version=None)
    return _state


def available() -> bool:
  """True if the oneDNN kernel is built (building it now if needed), loaded and registered."""
  return _load()["lib"] is not None


def why_unavailable() -> str:
  """The reason ``available()`` is False, on one line ('' when it is True)."""
  reason = " ".join((_load()["error"] or "").split())
  return reason if len(reason) <= 400 else reason[:400] + " ..."


def version() -> str | None:
  """The loaded oneDNN's version, e.g. '2.6.3' (None when unavailable)."""
  v = _load()["version"]
  return None if v is None else f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _plain_layout(dn: lax.ConvDimensionNumbers, nd: int) -> bool:
  """Whether the dimension numbers are N(D)HWC / (D)HWIO / N(D)HWC (what flax's Conv uses)."""
  spatial = tuple(range(1, nd - 1))
  return (
    tuple(dn.lhs_spec) == (0, nd - 1, *spatial)
    and tuple(dn.out_spec) == (0, nd - 1, *spatial)
    and tuple(dn.rhs_spec) == (nd - 1, nd - 2, *range(nd - 2))
  )


def _attrs(strides, pads) -> dict:
  return {
    "strides": np.asarray(strides, np.int64),
    "pad_lo": np.asarray([lo for lo, _ in pads], np.int64),
    "pad_hi": np.asarray([hi for _, hi in pads], np.int64),
  }


def _call(pass_name: str, out_shape, a, b, attrs):
  out = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
  return jax.ffi.ffi_call(TARGETS[pass_name][0], out, vmap_method="sequential")(a, b, **attrs)


def onednn_conv(x, w, strides, pads):
  """The oneDNN conv with its custom VJP: x [N, *S, C], w [*K, C, O] -> [N, *S', O] float32.

  ``strides``: one int per spatial dim; ``pads``: one (low, high) pair of ints >= 0 per dim.
  Call ``available()`` first (it registers the handlers).
  """
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if all(k == 1 for k in w.shape[:-2]) and not any(lo or hi for lo, hi in pads):
    # A strided 1x1 conv is a unit-stride 1x1 conv of the subsampled input. Done here, so
    # oneDNN never runs its strided 1x1 path ("rtus"): in oneDNN 2.x its weight gradient
    # writes past its workspace when the input channels are not a multiple of the ISA's
    # channel block (16 on AVX-512) in NHWC -- heap corruption / SIGSEGV / wrong values
    # (uxlfoundation/oneDNN#6035; found here: ResNet width 1/8, the 8->16 shortcut conv).
    # The subsampling's own gradient (a strided scatter) is XLA's.
    if any(s > 1 for s in strides):
      x = x[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
      strides = (1,) * len(strides)
  attrs = _attrs(strides, pads)
  spatial = x.shape[1:-1]
  out_shape = (
    x.shape[0],
    *(
      (n + lo + hi - k) // s + 1
      for n, (lo, hi), k, s in zip(spatial, pads, w.shape[:-2], strides, strict=True)
    ),
    w.shape[-1],
  )

  @jax.custom_vjp
  def conv(x, w):
    return _call("fwd", out_shape, x, w, attrs)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, dy):
    x, w = res
    dx = _call("bwd_data", x.shape, dy, w, attrs)
    dw = _call("bwd_weights", w.shape, x, dy, attrs)
    return dx, dw

  conv.defvjp(fwd, bwd)
  return conv(x, w)


def supported(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  preferred_element_type=None,
):
  """The explicit (low, high) pads if oneDNN can run this conv, else None (use XLA's)."""
  nd = lhs.ndim
  if nd not in (4, 5) or rhs.ndim != nd:
    return None
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  if (
    preferred_element_type not in (None, jnp.float32)
    and jnp.dtype(preferred_element_type) != jnp.float32
  ):
    return None
  if feature_group_count != 1 or batch_group_count != 1:
    return None
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return None
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if not _plain_layout(dn, nd):
    return None
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], window_strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  if len(pads) != nd - 2 or any(lo < 0 or hi < 0 for lo, hi in pads):
    return None
  for n, (lo, hi), k in zip(lhs.shape[1:-1], pads, rhs.shape[:-2], strict=True):
    if n + lo + hi < k:
      return None
  if min(lhs.shape) == 0 or min(rhs.shape) == 0:
    return None
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def make_conv_general_dilated(fallback=lax.conv_general_dilated):
  """A drop-in for ``lax.conv_general_dilated`` (the arguments flax's Conv passes): oneDNN for
  the supported cases (``supported``), ``fallback`` with the same arguments otherwise.

  ``precision`` is ignored on the oneDNN path (float32 throughout, as XLA:CPU's default).
  Raises RuntimeError if the kernel is not ``available()``.
  """
  if not available():
    raise RuntimeError(f"the oneDNN conv kernel is unavailable: {why_unavailable()}")

  def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ):
    pads = supported(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      preferred_element_type,
    )
    if pads is None:
      return fallback(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
      )
    return onednn_conv(lhs, rhs, window_strides, pads)

  return conv_general_dilated


def main(argv=None) -> int:
  """``python -m mtneuro_jax.kernels.onednn [build|status]``: build the kernel / report status."""
  import argparse

  p = argparse.ArgumentParser(prog="python -m mtneuro_jax.kernels.onednn", description=main.__doc__)
  p.add_argument("command", choices=("build", "status"), nargs="?", default="status")
  p.add_argument("--force", action="store_true", help="rebuild even if the cached .so exists")
  args = p.parse_args(argv)
  if args.command == "build":
    try:
      path = build(force=args.force, verbose=True)
    except RuntimeError as e:
      print(f"{e}\n{INSTALL_HINT}", file=sys.stderr)
      return 1
    print(f"built {path}")
  if not available():
    print(f"oneDNN conv kernel unavailable: {why_unavailable()}\n{INSTALL_HINT}", file=sys.stderr)
    return 1
  print(f"oneDNN conv kernel available: {_state['path']} (oneDNN {version()})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
