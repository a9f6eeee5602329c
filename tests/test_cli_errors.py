"""Bad command lines of scripts/bench_routers.py, scripts/train_tiny.py, scripts/infer.py and
scripts/bench_quality.py: each is refused before any work starts with exit 2 and exactly one
stderr line ``<prog>: error: <message>`` naming the option (no usage block, no traceback); good
command lines still parse.

Most cases call the scripts' ``parse_args`` in-process (milliseconds each; every option is
validated there, the corpus and the output folder included); three run the scripts end to end
in a subprocess and check that they exit at once, with no traceback.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"bench_routers.py": "bench_routers", "train_tiny.py": "train_tiny"}
_MODULES: dict[str, object] = {}


def _script(prog: str):
    """The script loaded as a module (once per test session), as test_bench_routers does."""
    if prog not in _MODULES:
        spec = importlib.util.spec_from_file_location(SCRIPTS[prog], ROOT / "scripts" / prog)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[prog] = module
    return _MODULES[prog]


SHORT_MODEL = """name: short
vocab_size: 256
hidden_size: 32
num_layers: 2
num_attention_heads: 2
ffn_hidden_size: 64
num_experts: 4
topk: 2
max_sequence_length: 64
"""

HUGE_MODEL = """name: huge
vocab_size: 256
hidden_size: 8192
num_layers: 32
num_attention_heads: 64
ffn_hidden_size: 16384
num_experts: 64
topk: 8
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A folder of inputs: a regular file, corpora good and bad, model configs."""
    (tmp_path / "file.txt").write_text("not a folder\n")
    good = tmp_path / "corpus"
    good.mkdir()
    words = "the router sends each token to two experts and the load is uneven".split()
    (good / "prose.txt").write_text(
        "\n\n".join(" ".join(words[i % 7 :] + words[: i % 7]) * 40 for i in range(30))
    )
    (good / "code.txt").write_text(
        "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 60 for i in range(30))
    )
    few = tmp_path / "few_docs"
    few.mkdir()
    (few / "small.txt").write_text("one paragraph\n\nand another\n")
    short = tmp_path / "short_heldout"  # ten documents, the held-out tenth 1 byte long
    short.mkdir()
    (short / "text.txt").write_text("\n\n".join(["y" * 4096] * 9 + ["x"]))
    (tmp_path / "no_files").mkdir()
    (tmp_path / "no_files" / "sub").mkdir()
    (tmp_path / "short.yaml").write_text(SHORT_MODEL)
    (tmp_path / "huge.yaml").write_text(HUGE_MODEL)
    (tmp_path / "wide_vocab.yaml").write_text(SHORT_MODEL.replace("vocab_size: 256", "vocab_size: 512"))
    return tmp_path


def _argv(prog: str, argv: list[str], tmp: Path) -> list[str]:
    """``{tmp}`` filled in; an ``--out`` under ``tmp`` unless the case sets its own."""
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp / ("r.json" if prog == "bench_routers.py" else "ckpt"))]
    return argv


def _one_line_error(capsys, prog: str, option: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    assert option in line, (option, line)
    assert "Traceback" not in err
    return line


BENCH = "bench_routers.py"
TRAIN = "train_tiny.py"

# (script, argv, the option the message must name, and a phrase of what is allowed)
BAD = [
    # bench_routers.py: LASER parameters, checked against every preset's gate and layer
    (BENCH, ["--laser-args", "pool_size=1"], "--laser-args", "pool_size (c) must be in [topk=2"),
    (BENCH, ["--presets", "mixtral", "--laser-args", "pool_size=9"], "--laser-args", "num_experts=8"),
    (BENCH, ["--laser-args", "top_m=100"], "--laser-args", "top_m must be <= num_experts"),
    (BENCH, ["--presets", "mixtral", "--laser-args", "per_layer={7: {pool_size: 9}}"],
     "--laser-args", "workload mixtral layer 7"),
    (BENCH, ["--laser-args", "per_layer={3: {pool_size: 4}}"], "--laser-args", "allowed layers"),
    (BENCH, ["--laser-args", "eps_high=nan"], "--laser-args", "finite number"),
    (BENCH, ["--laser-args", "repair_rounds=1000000000"], "--laser-args", "<= 64"),
    (BENCH, ["--laser-args", "repair_rounds"], "--laser-args", "expects key=value"),
    (BENCH, ["--laser-args", "renormalize=true"], "--laser-args", "unknown LaserParams field"),
    # bench_routers.py: batch sizes, repeats, threads
    (BENCH, ["--tokens", "1e9"], "--tokens", "comma-separated integers"),
    (BENCH, ["--tokens", "99999999999999999999"], "--tokens", "<= 262144"),
    (BENCH, ["--tokens", "0"], "--tokens", ">= 1"),
    (BENCH, ["--tokens", "-64"], "--tokens", ">= 1"),
    (BENCH, ["--tokens", "64,64"], "--tokens", "more than once"),
    (BENCH, ["--tokens", ","], "--tokens", "at least one"),
    (BENCH, ["--repeats", "0"], "--repeats", ">= 1"),
    (BENCH, ["--repeats", "1000000000"], "--repeats", "<= 1000"),
    (BENCH, ["--threads", "0"], "--threads", ">= 1"),
    (BENCH, ["--threads", "100000"], "--threads", "<= 1024"),
    (BENCH, ["--seed", "1.5"], "--seed", "invalid int value"),
    # bench_routers.py: presets and domain
    (BENCH, ["--presets", ","], "--presets", "at least one"),
    (BENCH, ["--presets", "gpt4"], "--presets", "choose one of"),
    (BENCH, ["--presets", "olmoe,olmoe"], "--presets", "more than once"),
    (BENCH, ["--domain", "wiki"], "--domain", "has domains"),
    # bench_routers.py: output paths, checked before any work
    (BENCH, ["--out", "{tmp}"], "--out", "must name a file"),
    (BENCH, ["--out", "{tmp}/r.md"], "--out", "suffix .md"),
    (BENCH, ["--out", "{tmp}/file.txt/r.json"], "--out", "is a file, not a directory"),
    # bench_routers.py: no abbreviations, no unknown options
    (BENCH, ["--tok", "64"], "--tok", "unrecognized arguments"),
    (BENCH, ["--bogus"], "--bogus", "unrecognized arguments"),
    # train_tiny.py: floats must be finite and in range
    (TRAIN, ["--lr", "nan"], "--lr", "finite number > 0 and <= 1.0"),
    (TRAIN, ["--lr", "inf"], "--lr", "finite number"),
    (TRAIN, ["--lr", "0"], "--lr", "> 0"),
    (TRAIN, ["--lr", "2"], "--lr", "<= 1.0"),
    (TRAIN, ["--lr", "abc"], "--lr", "invalid float value"),
    (TRAIN, ["--aux-loss-coeff", "nan"], "--aux-loss-coeff", "finite number >= 0"),
    (TRAIN, ["--aux-loss-coeff", "-1"], "--aux-loss-coeff", ">= 0"),
    # train_tiny.py: integers in range, sizes that would exhaust memory or never end
    (TRAIN, ["--steps", "0"], "--steps", "[1, 1000000]"),
    (TRAIN, ["--steps", "10000000000"], "--steps", "[1, 1000000]"),
    (TRAIN, ["--batch", "100000000"], "--batch", "[1, 1024]"),
    (TRAIN, ["--batch", "1024", "--seq-len", "512"], "--batch x --seq-len", "<= 32768"),
    (TRAIN, ["--seq-len", "0"], "--seq-len", "[1, 32768]"),
    (TRAIN, ["--warmup", "-1"], "--warmup", "[0, 1000000]"),
    (TRAIN, ["--log-every", "0"], "--log-every", "[1, 1000000]"),
    (TRAIN, ["--seed", "-1"], "--seed", "init_seed"),
    (TRAIN, ["--seed", str(2**63)], "--seed", "init_seed"),
    (TRAIN, ["--threads", "0"], "--threads", "[1, 1024]"),
    (TRAIN, ["--threads", "100000"], "--threads", "[1, 1024]"),
    (TRAIN, ["--eval-seqs", "0"], "--eval-seqs", "[1, 4096]"),
    (TRAIN, ["--eval-seqs", "1000000"], "--eval-seqs", "[1, 4096]"),
    # train_tiny.py: the model config
    (TRAIN, ["--seq-len", "600"], "--seq-len", "max_sequence_length 512"),
    (TRAIN, ["--config", "{tmp}/short.yaml", "--seq-len", "65"], "--seq-len",
     "max_sequence_length 64"),
    (TRAIN, ["--config", "{tmp}/nope.yaml"], "--config", "not found"),
    (TRAIN, ["--config", "{tmp}/wide_vocab.yaml"], "--config", "vocab_size must be 256"),
    (TRAIN, ["--config", "{tmp}/huge.yaml"], "--config", "at most 1 B"),
    # train_tiny.py: the corpus folder
    (TRAIN, ["--corpus", "/nonexistent"], "--corpus", "not found"),
    (TRAIN, ["--corpus", "{tmp}/file.txt"], "--corpus", "not a directory"),
    (TRAIN, ["--corpus", ""], "--corpus", "folder of text files"),
    (TRAIN, ["--corpus", "{tmp}/no_files"], "--corpus", "holds no files"),
    (TRAIN, ["--corpus", "{tmp}/few_docs"], "--corpus", "at least 10"),
    (TRAIN, ["--corpus", "{tmp}/short_heldout"], "--corpus", "held-out text"),
    # train_tiny.py: the checkpoint folder, checked before training
    (TRAIN, ["--out", "{tmp}/file.txt"], "--out", "not a directory"),
    (TRAIN, ["--out", "{tmp}/file.txt/ckpt"], "--out", "is a file, not a directory"),
    (TRAIN, ["--out", "{tmp}/dir_in_place"], "--out", "model.safetensors there is a directory"),
    # train_tiny.py: no abbreviations
    (TRAIN, ["--ste", "5"], "--ste", "unrecognized arguments"),
]


def _case_id(case) -> str:
    prog, argv, _, _ = case
    return f"{prog.split('_')[0]}:{' '.join(argv)[:60]}"


@pytest.mark.parametrize("prog, argv, option, allowed", BAD, ids=[_case_id(c) for c in BAD])
def test_bad_option_is_a_one_line_error(prog, argv, option, allowed, files, capsys):
    (files / "dir_in_place" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        _script(prog).parse_args(_argv(prog, argv, files))
    assert exc.value.code == 2
    line = _one_line_error(capsys, prog, option)
    assert allowed in line, (allowed, line)


@pytest.mark.parametrize("prog, argv, option", [
    (BENCH, ["--laser-args", "pool_size=1"], "--laser-args"),
    (TRAIN, ["--lr", "nan"], "--lr"),
    (TRAIN, ["--corpus", "/nonexistent"], "--corpus"),
])
def test_main_refuses_before_any_work(prog, argv, option, files, capsys):
    """``main`` itself: the same one line, before any benchmark or training starts."""
    import torch

    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        _script(prog).main(_argv(prog, argv, files))
    assert exc.value.code == 2
    _one_line_error(capsys, prog, option)
    assert torch.get_num_threads() == threads  # nothing was set up
    assert not (files / "ckpt").exists() and not (files / "r.json").exists()


def test_bench_good_command_lines_parse(files):
    bench = _script(BENCH)
    out = files / "r.json"
    args = bench.parse_args(["--quick", "--out", str(out)])
    assert args.tokens == list(bench.QUICK_TOKENS) and args.repeats == bench.QUICK_REPEATS
    assert args.presets == list(bench.PRESETS) and args.out == out
    args = bench.parse_args([
        "--presets", "mixtral", "--skewed", "none", "--tokens", "64, 128", "--repeats", "3",
        "--threads", "1", "--domain", "github", "--seed", "-7", "--out", str(out),
        "--laser-args", "pool_size=4", "per_layer={7: {pool_size: 3}}", "repair_rounds=8",
    ])
    assert args.tokens == [64, 128] and args.repeats == 3 and args.threads == 1
    assert args.laser_params.pool_size == 4 and args.laser_params.repair_rounds == 8
    assert args.laser_params.for_layer(7).pool_size == 3
    args = bench.parse_args(["--tokens", str(bench.MAX_TOKENS), "--out", str(files / "new" / "r.json")])
    assert args.tokens == [bench.MAX_TOKENS] and (files / "new").is_dir()
    assert list((files / "new").iterdir()) == []  # the write probe left nothing behind


def test_train_good_command_lines_parse(files):
    train = _script(TRAIN)
    out = files / "ckpt"
    args = train.parse_args(["--out", str(out)])  # the defaults
    assert (args.steps, args.batch, args.seq_len, args.lr) == (400, 16, 128, 3e-3)
    assert args.corpus_data is None and args.model.max_sequence_length == 512
    assert out.is_dir() and list(out.iterdir()) == []
    args = train.parse_args([
        "--config", str(files / "short.yaml"), "--corpus", str(files / "corpus"),
        "--out", str(out), "--steps", "12", "--batch", "4", "--seq-len", "64", "--warmup", "0",
        "--lr", "1", "--aux-loss-coeff", "0", "--seed", "5", "--threads", "1",
        "--eval-seqs", "2", "--log-every", "100",
    ])
    assert args.corpus_data.domains == ["code", "prose"]
    assert args.model.init_seed == 1234 + 5 and args.seq_len == args.model.max_sequence_length
    assert args.lr == 1.0 and args.aux_loss_coeff == 0.0


# End to end: the scripts as a user runs them, no traceback, and an answer at once.
SUBPROCESS = [
    (BENCH, ["--laser-args", "pool_size=1"], "--laser-args"),
    (TRAIN, ["--lr", "nan"], "--lr"),
    (TRAIN, ["--corpus", "/nonexistent"], "--corpus"),
]


@pytest.mark.parametrize("prog, argv, option", SUBPROCESS,
                         ids=[f"{p.split('_')[0]}:{' '.join(a)}" for p, a, _ in SUBPROCESS])
def test_script_exits_2_at_once_without_traceback(prog, argv, option, tmp_path):
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / ("r.json" if prog == BENCH else "ckpt")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / prog), *argv, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {option}"), done.stderr
    assert done.stdout == ""  # no table, no progress: nothing ran
    assert not out.exists()
    assert elapsed < 30, f"took {elapsed:.1f} s: the error must come before any work"


# ----------------------------------------------------------------------------- infer.py


INFER_BAD = [
    # (argv, the option named, what the message says is allowed or wrong)
    (["--router-args", "renormalize=maybe"], "renormalize", "true or false"),
    (["--router-args", "prefill_only=maybe"], "prefill_only", "true or false"),
    (["--router", "laser", "--router-args", "min_score_ratio=abc"], "min_score_ratio", "[0, 1]"),
    (["--router-args", "capacity_factor=1e300"], "capacity_factor", "number"),
    (["--router-args", "capacity_factor=1.0e300"], "capacity_factor", "<= 1000000"),
    (["--router", "laser", "--router-args", "repair_rounds=1000000000"], "repair_rounds", "64"),
    (["--router-args", "max_experts_per_token=true"], "max_experts_per_token", "integer"),
    (["--router", "laser", "--router-args", "per_layer=5"], "per_layer", "mapping"),
    (["--router", "laser", "--router-args", "per_layer=[1, 2]"], "per_layer", "mapping"),
    (["--router", "laser", "--router-args", "per_layer={x: {}}"], "per_layer", "integer"),
    (["--router", "laser", "--router-args", "eps_high=nan"], "eps_high", "finite"),
    (["--batch", "100000000"], "--batch", "the largest --batch that fits is"),
    (["--batch", "0"], "--batch", ">= 1"),
    (["--eval-len", "0"], "--eval-len", ">= 1"),
    (["--timeout", "nan"], "--timeout", "> 0"),
    (["--framework", "jax"], "--framework", "megatron"),
    (["--framework", "deepspeed", "--dispatcher", "allgather"], "--dispatcher", "alltoall"),
    (["--load-scope", "everywhere"], "load_scope", "local"),
    (["--ep", "0"], "--ep", ">= 1"),
    (["--set", "bogus=1"], "--set", "allowed"),
    (["--set", "compare=maybe"], "compare", "true or false"),
    (["--run-config", "no-such-run"], "--run-config", "presets"),
    (["--router-args-file", "/nonexistent.yaml"], "--router-args-file", "not found"),
    (["--run", "demo"], "--run", "unrecognized"),  # no abbreviations
    (["--config", "tiny", "--skew", "flat"], "--skew", "olmoe"),
    (["--replicate", "yes"], "--replicate", "'auto'"),
    (["--replicate", "auto", "--redundant", "0"], "--redundant", ">= 1"),
    (["--calibration-domain", "code"], "--calibration-domain", "--replicate auto"),
    (["--memory-budget", "same"], "--memory-budget", "without replicas"),
    (["--placement", "/nonexistent-plan.json"], "placement file", "not found"),
    (["--prompt-domain", "poetry"], "--prompt-domain", "('code', 'prose')"),
    (["--replica-policy", "random"], "policy", "round_robin"),
    (["--record-routing", ""], "--record-routing", "must name a file"),
    (["--record-routing", "/tmp"], "--record-routing", "must name a file"),
    (["--cache-experts", "1"], "--cache-experts", "[2, 8]"),
    (["--cache-experts", "9"], "--cache-experts", "[2, 8]"),
    (["--router", "laser", "--cache-aware"], "--cache-aware", "--cache-experts N"),
    (["--router", "topk", "--cache-experts", "4", "--cache-aware"], "--cache-aware", "laser"),
    (["--router", "laser", "--load-scope", "global", "--cache-experts", "4", "--cache-aware"],
     "--cache-aware", "--load-scope local"),
]


def _infer():
    if "infer.py" not in _MODULES:
        spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "scripts" / "infer.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES["infer.py"] = module
    return _MODULES["infer.py"]


@pytest.mark.parametrize("argv, option, allowed", INFER_BAD, ids=[" ".join(c[0]) for c in INFER_BAD])
def test_infer_bad_option_is_a_one_line_error(argv, option, allowed, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exc:
        _infer().parse_args(argv)
    assert exc.value.code == 2
    line = _one_line_error(capsys, "infer.py", option)
    assert allowed in line, (allowed, line)


def test_infer_output_problems_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    infer = _infer()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    existing = tmp_path / "earlier.json"
    existing.write_text('{"runs": ["kept"]}\n')
    for out, message in [
        (blocker / "out.json", "cannot write there"),
        ("/proc/out.json", "cannot write there"),
        (existing, "exists (another run's results); pass --overwrite"),
    ]:
        run = infer.parse_args(["--config", "tiny", "--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            infer.claim(run, ["infer.py"])
        assert exc.value.code == 2
        assert message in _one_line_error(capsys, "infer.py", "--out")
    assert existing.read_text() == '{"runs": ["kept"]}\n'  # never touched
    # with --overwrite the folder is checked and the old file kept until results replace it
    run = infer.parse_args(["--config", "tiny", "--out", str(existing), "--overwrite"])
    infer.claim(run, ["infer.py"])
    assert existing.read_text() == '{"runs": ["kept"]}\n'
    # a fresh path is claimed at once: a second job aiming at it is refused
    fresh = tmp_path / "fresh.json"
    run = infer.parse_args(["--config", "tiny", "--out", str(fresh)])
    infer.claim(run, ["infer.py", "--out", str(fresh)])
    with pytest.raises(SystemExit):
        infer.claim(run, ["infer.py", "--out", str(fresh)])
    assert "partial" in fresh.read_text()


BENCH_QUALITY_BAD = [
    (["--chunk", "0"], "--chunk", ">= 1"),
    (["--seq-len", "-1"], "--seq-len", ">= 1"),
    (["--seq-len", "600"], "--seq-len", "max_sequence_length"),
    (["--ep", "3"], "--ep", "divide"),
    (["--grid", "/nonexistent.yaml"], "--grid", "not found"),
    (["--framework", "jax"], "--framework", "choose from"),
]


@pytest.mark.parametrize("argv, option, allowed", BENCH_QUALITY_BAD,
                         ids=[" ".join(c[0]) for c in BENCH_QUALITY_BAD])
def test_bench_quality_bad_option_is_a_one_line_error(argv, option, allowed, capsys):
    if "bench_quality.py" not in _MODULES:
        spec = importlib.util.spec_from_file_location("bench_quality_cli", ROOT / "scripts" / "bench_quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES["bench_quality.py"] = module
    with pytest.raises(SystemExit) as exc:
        _MODULES["bench_quality.py"].parse_args(argv)
    assert exc.value.code == 2
    line = _one_line_error(capsys, "bench_quality.py", option)
    assert allowed in line, (allowed, line)
