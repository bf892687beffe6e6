"""mtneuro_jax/host_malloc.py: huge pages for XLA's per-call temporary block, set at start-up.

The fault counts come from fresh interpreters: glibc reads its tunables when a process starts.
"""

import json
import os
import subprocess
import sys

import pytest

from mtneuro_jax import host_malloc
from mtneuro_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function with a 64 MiB temporary (sin of a 4096² float32 array; glibc maps anything
# above 32 MiB); prints the minor page faults of five calls after the first.
PROBE = """
import json, resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x[:, :64])).sum())
x = jnp.ones((4096, 4096), jnp.float32)
f(x).block_until_ready()
faults = []
for _ in range(5):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"faults": faults, "temp_bytes": temp}))
"""


def _run(code: str, env: dict, *args: str) -> str:
  """Stdout of ``python -c code args...`` in ``env`` (on one real CPU device); asserts status 0."""
  env = {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


@pytest.mark.skipif(not host_malloc.supported(), reason="needs glibc >= 2.35 and THP")
def test_huge_pages_cut_the_page_faults_of_the_temporary_block():
  probe = {
    m: json.loads(_run(PROBE, host_malloc.environ(os.environ, m)).splitlines()[-1])
    for m in host_malloc.MODES
  }
  pages = probe["system"]["temp_bytes"] // 4096  # the block in 4 KiB pages (16384 here)
  assert pages >= 16384
  # glibc's default: every call maps the block anew and faults each 4 KiB page in.
  assert min(probe["system"]["faults"]) >= pages // 2, probe
  # Huge pages: 2 MiB per fault where the block is 2 MiB-aligned (measured: 800-1060 faults).
  assert sorted(probe["hugepages"]["faults"])[2] < pages // 8, probe


def test_environ_adds_or_removes_only_our_tunable():
  base = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "HOME": "/h"}
  on = host_malloc.environ(base, "hugepages")
  assert on["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  assert on["HOME"] == "/h" and on[host_malloc.ENV] == "hugepages" and host_malloc.active(on)
  assert host_malloc.environ(on, "hugepages")["GLIBC_TUNABLES"] == on["GLIBC_TUNABLES"]
  off = host_malloc.environ(on, "system")
  assert off["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0" and not host_malloc.active(off)
  assert "GLIBC_TUNABLES" not in host_malloc.environ({}, "system")
  assert base == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "HOME": "/h"}  # untouched
  with pytest.raises(ConfigError, match="malloc mode 'fast'"):
    host_malloc.environ(base, "fast")


def test_bad_mode_is_a_config_error(monkeypatch):
  monkeypatch.setenv(host_malloc.ENV, "jemalloc")
  with pytest.raises(ConfigError, match="MTNEURO_MALLOC='jemalloc'"):
    host_malloc.mode()


@pytest.mark.skipif(not host_malloc.supported(), reason="needs glibc >= 2.35 and THP")
def test_reexec_sets_the_tunable_once_and_keeps_the_arguments():
  code = (
    "import os, sys\nfrom mtneuro_jax import host_malloc\nprint('start', flush=True)\n"
    "host_malloc.reexec_with_hugepages()\nprint(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
  )
  env = host_malloc.environ(os.environ, "system")
  env.pop(host_malloc.ENV)
  lines = _run(code, env, "a", "b").splitlines()
  # 'start' twice (before and after the re-exec), then the new environment, arguments intact.
  assert lines[:2] == ["start", "start"], lines
  assert lines[2].endswith("glibc.malloc.hugetlb=1 ['a', 'b']"), lines
  # Opted out: no re-exec.
  lines = _run(code, {**env, host_malloc.ENV: "system"}).splitlines()
  assert lines[0] == "start" and "start" not in lines[1:], lines


def test_mtneuro_command_checks_the_mode_first(monkeypatch, capsys):
  from experiments import cli

  monkeypatch.setenv(host_malloc.ENV, "bogus")
  assert cli.main(["verify", "/nonexistent"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "MTNEURO_MALLOC='bogus'" in err[0]


TRIM_PROBE = """
import json, sys
from mtneuro_jax import host_malloc

def rss_mib():
  return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

# 200 MiB in 64 KiB blocks (below glibc's mmap threshold: they live in the heap); keeping every
# 16th pins the heap's top, so freeing the rest leaves ~190 MiB free inside it, still resident.
blocks = [bytearray(b"x" * 65536) for _ in range(3200)]
kept = blocks[::16]
del blocks
before = rss_mib()
released = host_malloc.release_free_memory() if sys.argv[1] == "trim" else False
print(json.dumps({"released": released, "drop_mib": before - rss_mib(), "kept": len(kept)}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_release_free_memory_returns_the_heaps_free_pages():
  env = host_malloc.environ(os.environ, "system")
  trimmed, untouched = (json.loads(_run(TRIM_PROBE, env, m)) for m in ("trim", "keep"))
  assert trimmed["released"] and trimmed["drop_mib"] > 120, trimmed  # measured: ~180 MiB
  assert abs(untouched["drop_mib"]) < 20, untouched
