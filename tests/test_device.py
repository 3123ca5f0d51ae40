"""Devices: `ModelConfig.device` / `--device` checks, and no CPU assumption left in an engine step.

A CPU-only machine cannot run a step on a GPU, so the step is audited instead (`StepAudit`), with
the C++ decode kernel off as on a GPU:

- every tensor factory call (`torch.tensor`, `torch.arange`, `torch.zeros`, ...) made from
  kvengine's code while engines are built and stepped must say where its tensor goes (`device=`).
  A call without one makes a CPU tensor whatever the model's device: the bug a GPU run would hit.
  Host bookkeeping (block tables, ref counts) says `device=HOST` on purpose;
- no kvengine code inside a layer's attention hands a tensor's value to Python (`.item()`,
  `bool()`, `int()`, `.tolist()`, `nonzero`, `unique`): on a GPU each one waits for the device,
  once per layer. Step metadata is built once per step instead.

`pytest --device cuda` (tools/gpu_check.sh) runs the same engines on a GPU for real.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DEVICE, hf_greedy, tiny_model
from torch.overrides import TorchFunctionMode

import kvengine
from kvengine.cli import main
from kvengine.config import CacheConfig, ModelConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel, load, load_from_config
from kvengine.models.device import resolve_device
from kvengine.press import make_press, press_from_spec

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.arange, torch.empty, torch.zeros, torch.ones, torch.full,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace,
}  # fmt: skip
_KVENGINE_DIR = str(Path(kvengine.__file__).parent) + "/"
_TORCH_DIR = str(Path(torch.__file__).parent) + "/"
NO_CUDA = not torch.cuda.is_available()


SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique"}


class StepAudit(TorchFunctionMode):
    """Records `file:line (function)` of kvengine's factory calls without a device (`factory_sites`)
    and of its host syncs while a layer's attention runs (`layer_sync_sites`)."""

    def __init__(self) -> None:
        super().__init__()
        self.factory_sites: set[str] = set()
        self.layer_sync_sites: set[str] = set()
        self.num_factory_calls = 0

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES:
            self.num_factory_calls += 1
            if kwargs.get("device") is None and (site := _kvengine_caller(sys._getframe(1))):
                self.factory_sites.add(site)
        elif (
            getattr(func, "__name__", "") in SYNCS
            and (site := _kvengine_caller(sys._getframe(1)))
            and _inside_attention(sys._getframe(1))
        ):
            self.layer_sync_sites.add(site)
        return func(*args, **kwargs)


def _kvengine_caller(frame: Any) -> str | None:
    """`kvengine/file.py:line (function)` of the first caller outside torch, if it is kvengine's."""
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(_KVENGINE_DIR):
        return None
    return f"kvengine/{frame.f_code.co_filename.removeprefix(_KVENGINE_DIR)}:{frame.f_lineno} ({frame.f_code.co_name})"


def _inside_attention(frame: Any) -> bool:
    """True while kvengine's attention function (called once per layer) is on the stack."""
    while frame is not None:
        if frame.f_code.co_name == "paged_attention" and frame.f_code.co_filename.endswith("attention.py"):
            return True
        frame = frame.f_back
    return False


# ---- names and availability ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1", "mps", "xpu", "xpu:0"])
def test_known_device_names_are_accepted_by_the_config(name: str) -> None:
    assert ModelConfig(device=name).device == name


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:", "cuda:-1", "CPU", "", "cpu:0 "])
def test_unknown_device_names_are_refused_naming_device(name: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"device must be one of auto, cpu, cuda"):
        ModelConfig(device=name)


def test_auto_is_a_gpu_where_torch_sees_one_else_the_cpu() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_on_a_machine_without_it_is_a_clear_error(name: str) -> None:
    with pytest.raises(InvalidRequestError, match=rf"device '{name}' is not available: .*(CUDA|GPU)"):
        resolve_device(name)


def test_a_gpu_index_past_the_last_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"device 'cuda:99' is not available"):
        resolve_device("cuda:99")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_load_checks_the_device_before_anything_else() -> None:
    # The model does not exist: the device error comes first, before any file is looked at.
    with pytest.raises(InvalidRequestError, match=r"device 'cuda' is not available"):
        load("no-such-model", device="cuda")


def test_load_and_load_from_config_put_the_model_on_the_device(tmp_path: Path) -> None:
    tiny_model("llama").hf_model.save_pretrained(tmp_path)
    model = load(str(tmp_path), dtype="float32", device="cpu", progress=False)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    config = ModelConfig(name=str(tmp_path), dtype="float32", device="cpu")
    assert load_from_config(config, progress=False).device == torch.device("cpu")
    if NO_CUDA:
        with pytest.raises(InvalidRequestError, match="device 'cuda' is not available"):
            load_from_config(ModelConfig(name=str(tmp_path), device="cuda"), progress=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi", "--device", "tpu"],
        ["serve", "--device", "gpu"],
        ["eval", "--device", "cuda:x"],
        ["bench", "decode", "--device", "tpu"],
    ],
)
def test_cli_refuses_unknown_devices(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and "device must be one of" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_cli_asking_for_a_missing_gpu_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--device", "cuda", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' is not available" in err and len(err.strip().splitlines()) == 1


# ---- no CPU assumption in a step ----------------------------------------------------------


def test_the_audit_catches_a_factory_call_without_a_device() -> None:
    """The positive control: code under kvengine/ that builds a host tensor is reported."""
    fake = compile("torch.arange(3)\ntorch.zeros(2, device=None)\ntorch.ones(2, device='cpu')\n",
                   _KVENGINE_DIR + "fake_module.py", "exec")  # fmt: skip
    with StepAudit() as audit:
        exec(fake, {"torch": torch})
        torch.arange(3)  # from this test file: not kvengine's
    assert audit.factory_sites == {
        "kvengine/fake_module.py:1 (<module>)",
        "kvengine/fake_module.py:2 (<module>)",
    }


def _run_engines(model: LoadedModel, window_model: LoadedModel) -> list[list[int]]:
    """Engines over every step kind: chunked prefill, batched decode, presses, sampling,
    penalties, logprobs, a sliding window, block selection (plain pools)."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([40, 9, 23])]
    outputs = []
    engine = Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22), SchedulerConfig(max_step_tokens=32))
    ids = [engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
    ids.append(
        engine.add_request(
            prompts[0], SamplingParams(max_tokens=4), press=press_from_spec("adakv:snapkv", 0.5)
        )
    )
    sampled = SamplingParams(
        max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, seed=1, logprobs=2, prompt_logprobs=1,
        repetition_penalty=1.2, frequency_penalty=0.5, logit_bias=((5, 2.0),),
    )  # fmt: skip
    ids.append(engine.add_request(prompts[1], sampled))
    decoding = engine.add_request(
        prompts[2], SamplingParams(max_tokens=6), decode_press=make_press("h2o"), decode_budget=16
    )
    engine.run()
    outputs += [engine.sequences[i].output_ids for i in [*ids, decoding]]
    selecting = Engine(model, CacheConfig(block_size=4, select_blocks=0.5))
    outputs.append(selecting.generate([prompts[0]], SamplingParams(max_tokens=5))[0].output_ids)
    windowed = Engine(window_model, CacheConfig(block_size=4))
    outputs.append(windowed.generate([prompts[0] * 2], SamplingParams(max_tokens=5))[0].output_ids)
    return outputs


@pytest.fixture(scope="module")
def audits() -> tuple[StepAudit, StepAudit, LoadedModel, list[list[int]]]:
    """Audits of the plain-pool engines and of a packed (KIVI) engine, the decode kernel off."""
    model, window_model = tiny_model("llama"), tiny_model("mistral")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kvengine.engine.runner.decode_kernel_for", lambda device, seals_blocks: None)
        with StepAudit() as plain:
            outputs = _run_engines(model, window_model)
        with StepAudit() as packed:
            engine = Engine(model, CacheConfig(block_size=4, kv_bits=2))
            outputs.append(
                engine.generate([[3 + j for j in range(30)]], SamplingParams(max_tokens=5))[0].output_ids
            )
    return plain, packed, model, outputs


def test_an_engine_step_builds_every_tensor_on_a_stated_device(audits: tuple) -> None:
    plain, packed, model, outputs = audits
    assert plain.num_factory_calls > 100  # the audit saw the steps' factory calls
    sites = sorted(plain.factory_sites | packed.factory_sites)
    assert not sites, "factory calls without device= in kvengine:\n" + "\n".join(sites)
    # The audited run is a real one: greedy outputs are transformers' own.
    assert outputs[0] == hf_greedy(model, [(7 * 0 + j) % 250 + 3 for j in range(40)], 6)


def test_no_host_sync_inside_a_layer_with_a_plain_pool(audits: tuple) -> None:
    plain, packed, _, _ = audits
    assert not plain.layer_sync_sites, "host syncs inside a layer:\n" + "\n".join(
        sorted(plain.layer_sync_sites)
    )
    # The packed pool still reads slot values back per layer (which blocks are sealed): the
    # audit sees those, so it is not blind. Only quant_pool.py does.
    assert packed.layer_sync_sites
    assert all(site.startswith("kvengine/cache/quant_pool.py") for site in packed.layer_sync_sites), (
        packed.layer_sync_sites
    )


def test_pool_and_step_tensors_live_on_the_models_device() -> None:
    """On whatever `--device` the suite runs (the CPU here, a GPU under tools/gpu_check.sh)."""
    model = tiny_model("llama")
    assert model.device.type == DEVICE.type
    engine = Engine(model, CacheConfig(block_size=4))
    assert engine.pool.device == model.device and engine.pool.k.device == model.device
    prompt = [3 + j for j in range(30)]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=8))
    assert out.output_ids == hf_greedy(model, prompt, 8)
    assert engine.pool.ref_counts.device == torch.device("cpu")  # bookkeeping stays on the host
