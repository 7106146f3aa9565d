"""Every script in benchmarks/ and examples/ runs its `--smoke` mode on the CPU: a tiny model, every lazy import,
setup and table of the script, with the cells only a CUDA GPU can fill printed as "skipped: needs CUDA".

A GPU is lent for minutes at a time (issue 30): whatever can fail without one (a stale import, a renamed function,
a table that no longer formats) must fail here first. Each script runs in its own process, as a user starts it;
the test reads the table it printed (its real row and column names), the cells it says it skipped, and, as a
control, that a script with nothing GPU-only says it skipped nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "skipped: needs CUDA"


@dataclass(frozen=True)
class Smoke:
    """What one script's smoke run must print: `table` strings anywhere in its output, and, for each label in
    `cuda_only`, a line that holds the label and says it was skipped (empty: no line may say so)."""

    table: tuple[str, ...]
    cuda_only: tuple[str, ...] = ()
    args: tuple[str, ...] = field(default=())


SCRIPTS = {
    "benchmarks/gpu_checks.py": Smoke(
        table=("check", "verdict", "result", "kernels installed", "automatic attention path",
               "training attention path", "merged model reloads to the trained embeddings",
               "GradCache first loss vs plain", "training tokens/s, recipe batch 4",
               "training speed-up over Qwen2Model+PEFT+ST", "first loss, DiffEmbed vs baseline",
               "benchmark attention path (backward)", "training gradcache: tokens/s, peak memory",
               "training long: tokens/s, peak memory", "FP8 vs bf16 inference speed, cosine",
               "FP8 vs bf16 retrieval (demo's held-out task)"),
        cuda_only=("kernel self-checks", "training long: tokens/s, peak memory", "FP8 vs bf16 inference speed")),
}


def run_smoke(script: str, args: tuple[str, ...], timeout: float = 1200) -> subprocess.CompletedProcess:
    """`python SCRIPT --smoke` from the repository root, in its own process group (killed whole on timeout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.Popen([sys.executable, script, "--smoke", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{script} --smoke ran past {timeout} s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_smoke(script):
    smoke = SCRIPTS[script]
    done = run_smoke(script, smoke.args)
    out = done.stdout
    assert done.returncode == 0, f"{script} --smoke exited {done.returncode}:\n{out[-6000:]}"
    missing = [name for name in smoke.table if name not in out]
    assert not missing, f"{script} --smoke did not print {missing}:\n{out[-6000:]}"
    lines = out.splitlines()
    for label in smoke.cuda_only:
        assert any(label in line and SKIPPED in line for line in lines), \
            f"{script}: no line with {label!r} says {SKIPPED!r}:\n{out[-6000:]}"
    if not smoke.cuda_only:  # the control: a script with nothing GPU-only skips nothing
        assert SKIPPED not in out, f"{script} skipped something it should run on the CPU:\n{out[-6000:]}"


def test_every_script_has_a_smoke_run():
    """A new script in benchmarks/ or examples/ cannot be missed: the parametrization above must name it."""
    scripts = {str(p.relative_to(ROOT)) for folder in ("benchmarks", "examples") for p in (ROOT / folder).glob("*.py")}
    assert scripts == set(SCRIPTS), (f"without a smoke entry: {sorted(scripts - set(SCRIPTS))}; "
                                     f"entries without a script: {sorted(set(SCRIPTS) - scripts)}")
