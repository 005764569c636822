"""oneDNN linear layers (core/linear.py): same numbers as torch's F.linear, scoped to the block."""
import copy

import pytest
import torch
from torch import nn

from prepack_actor.core import linear
from prepack_actor.core.linear import onednn_linear, onednn_refusal
from prepack_actor.core.modules import registrations, scan
from prepack_actor.engine import Engine, EngineConfig
from prepack_actor.core.params import SamplingParams
from prepack_actor.models import load_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

PROMPTS = ["The capital of France is", "a b c d e f g h i j k l m n o p", "Once upon a time, in a land"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")


def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


def test_block_swaps_every_linear_and_restores_it(tiny_model):
    model, _ = tiny_model
    mods = linears(model)
    assert mods and onednn_refusal(model) is None
    x = torch.randn(2, 7, mods[0].in_features)
    want = nn.functional.linear(x, mods[0].weight, mods[0].bias)
    with onednn_linear(model):
        assert all("forward" in m.__dict__ for m in mods)
        with onednn_linear(model):  # re-entrant: the inner block neither re-swaps nor restores
            pass
        assert all("forward" in m.__dict__ for m in mods)
        got = mods[0](x)
    assert all("forward" not in m.__dict__ for m in mods)  # outside: the model is plain HF again
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with onednn_linear(model, enabled=False):
        assert all("forward" not in m.__dict__ for m in mods)


def cpu_model(*modules, dtype=torch.float32) -> nn.Sequential:
    """The modules as a model with the device and dtype attributes onednn_linear reads."""
    model = nn.Sequential(*modules)
    model.device, model.dtype = torch.device("cpu"), dtype
    return model


def test_changed_weights_are_packed_again():
    lin = nn.Linear(16, 8)
    model = cpu_model(lin)
    x = torch.randn(3, 16)
    with onednn_linear(model):
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)
    with onednn_linear(model):
        after = lin(x)
    torch.testing.assert_close(after - lin.bias, 2 * (before - lin.bias), rtol=1e-5, atol=1e-5)


def test_a_replaced_layer_is_found_again_and_the_walk_is_cached_otherwise():
    model = cpu_model(nn.Linear(16, 8), nn.ReLU())
    walks = []
    select = lambda ms: walks.append(1) or [m for m in ms if type(m) is nn.Linear]  # noqa: E731
    assert scan(model, "test", select) == [model[0]] and scan(model, "test", select) == [model[0]]
    assert len(walks) == 1  # the second call reused the walk
    with onednn_linear(model):
        pass
    model[0] = nn.Linear(16, 8)  # an adapter or a new head: registered, so walked again
    assert scan(model, "test", select) == [model[0]] and len(walks) == 2
    x = torch.randn(3, 16)
    with onednn_linear(model):
        assert "forward" in model[0].__dict__  # the new layer runs oneDNN
        got = model(x)
    torch.testing.assert_close(got, torch.relu(nn.functional.linear(x, model[0].weight, model[0].bias)),
                               rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)  # works with packed weights cached (they sit beside the modules); walked anew
    assert scan(twin, "test", select) == [twin[0]] and len(walks) == 3
    model.half()  # no registration: the dtype is still checked on entry
    model.dtype = torch.float16
    with onednn_linear(model):
        assert "forward" not in model[0].__dict__


def test_engine_calls_register_no_modules_so_the_walk_holds(tiny_model):
    """kernels() runs every decode step: a step that registered a submodule would walk the model
    each time (~1 ms on the 70M Llama)."""
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig())
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine.generate_ids(ids[:1], [SamplingParams(max_new_tokens=2)])  # first call: probes, the walks
    before = registrations()
    engine.generate_ids(ids, [SamplingParams(max_new_tokens=6)] * len(ids))
    assert registrations() == before


def test_half_precision_is_refused_and_left_alone():
    model = cpu_model(nn.Linear(4, 4).half(), dtype=torch.float16)
    assert "float16" in onednn_refusal(model)
    with onednn_linear(model):
        assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("mkl", [False, True])
def test_engine_on_onednn_equals_engine_on_torch(tiny_model, monkeypatch, mkl):
    """Prefill and greedy tokens on the swapped layers equal torch's; with MKL_MLP (and passes and
    thresholds small enough for these prompts) the prefill's MLP passes run on MKL, decode on oneDNN."""
    model, tokenizer = tiny_model
    monkeypatch.setattr(linear, "MKL_MLP", mkl)
    monkeypatch.setattr(linear, "MLP_ROWS", 8)
    monkeypatch.setattr(linear, "MKL_MIN_ROWS", 16)
    passes, mkl_pass = [], linear._gated_mkl
    monkeypatch.setattr(linear, "_gated_mkl", lambda rows, *a, out: passes.append(rows.shape[0]) or mkl_pass(rows, *a, out=out))
    fast, plain = Engine(model, tokenizer), Engine(model, tokenizer, EngineConfig(onednn_linear=False))
    assert fast.onednn_linear and not plain.onednn_linear
    torch.testing.assert_close(fast.prefill(PROMPTS), plain.prefill(PROMPTS), rtol=0, atol=1e-4)
    assert bool(passes) == mkl and all(n <= 8 for n in passes)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in fast.generate(PROMPTS, params)] == \
           [r.token_ids for r in plain.generate(PROMPTS, params)]
    assert all("forward" not in m.__dict__ for m in linears(model))


class MLP(nn.Module):
    """gate/up/down + SiLU; `gated` picks the Llama forward or another shape with the same parts."""

    def __init__(self, gated: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.act_fn, self.gated = nn.SiLU(), gated

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


@pytest.mark.parametrize("gated", [True, False])
def test_gated_mlp_is_fused_only_when_its_forward_is_the_gated_one(gated):
    mlp = MLP(gated)
    model = cpu_model(mlp)
    x = torch.randn(2, 5, 16)
    want = mlp(x)
    with torch.inference_mode(), onednn_linear(model):
        assert ("forward" in mlp.__dict__) == gated  # fused MLP forward; the other keeps its own
        got = mlp(x)
    assert "forward" not in mlp.__dict__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mkl", [False, True])
def test_a_long_input_runs_the_gated_mlp_in_row_chunks_with_the_same_numbers(monkeypatch, mkl):
    """2,500 rows over 1,024-row passes (the last one partial) equal torch's MLP on all rows at once,
    on oneDNN's fused passes and on MKL's (MKL_MLP, Intel CPUs); a 64-row call (a decode step)
    stays on oneDNN either way."""
    mlp = MLP(True)
    model = cpu_model(mlp)
    x = torch.randn(2, 1250, 16)
    want = mlp(x)
    monkeypatch.setattr(linear, "MKL_MLP", mkl)
    calls = {"onednn": [], "mkl": []}
    onednn_pass, mkl_pass = linear._gated_rows, linear._gated_mkl
    monkeypatch.setattr(linear, "_gated_rows", lambda rows, *a: calls["onednn"].append(rows.shape[0]) or onednn_pass(rows, *a))
    monkeypatch.setattr(linear, "_gated_mkl", lambda rows, *a, out: calls["mkl"].append(rows.shape[0]) or mkl_pass(rows, *a, out=out))
    with torch.inference_mode(), onednn_linear(model):
        got = mlp(x)
        short = mlp(x[:, :32])
    assert calls == ({"onednn": [64], "mkl": [1024, 1024, 452]} if mkl else {"onednn": [1024, 1024, 452, 64], "mkl": []})
    assert linear.MLP_ROWS == 1024 and linear.MKL_MIN_ROWS == 512
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, want[:, :32], rtol=1e-5, atol=1e-5)

