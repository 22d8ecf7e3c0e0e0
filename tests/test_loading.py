"""fastinfer.loading: empty_init, load_weights_, load_model, load_pretrained, save_weights."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_python
from torch import nn
from torch.nn.utils import parametrize

import fastinfer
from fastinfer import testing
from fastinfer.errors import CheckpointError, ConfigError, StateDictMismatch, UnsafeCheckpointError
from fastinfer.loading import LoadReport, empty_init, load_model, load_weights_, save_weights

# --------------------------------------------------------------------------------------------
# Models used here
# --------------------------------------------------------------------------------------------


class Tied(nn.Module):
    """An LM-shaped toy with the output head tied to the embedding."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


class Parametrized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        parametrize.register_parametrization(self.a, "weight", Symmetric())
        self.b = nn.utils.parametrizations.weight_norm(self.b)
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.b(self.a(x))) * self.steps


def _eager(cls: Any, *args: Any, seed: int = 0, **kwargs: Any) -> nn.Module:
    with testing.seeded(seed):
        return cls(*args, **kwargs).eval()


CASES = {
    "tiny_mlp": (testing.TinyMLP, {}, lambda: torch.randn(4, 32)),
    "rotary_mlp": (testing.RotaryMLP, {"width": 64, "layers": 3}, lambda: torch.randn(3, 64)),
    "bert_like": (
        testing.BertLikeClassifier,
        {},
        lambda: testing.text_batch(batch_size=3, seq_len=12, padding=0.3),
    ),
    "tied": (Tied, {}, lambda: torch.randint(0, 50, (2, 7))),
    "parametrized": (Parametrized, {}, lambda: torch.randn(2, 8)),
}


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


# --------------------------------------------------------------------------------------------
# empty_init
# --------------------------------------------------------------------------------------------


def test_empty_init_puts_parameters_on_meta_and_builds_buffers_for_real() -> None:
    eager = _eager(testing.RotaryMLP, 64, 2)
    state = torch.random.get_rng_state()
    with empty_init():
        model = testing.RotaryMLP(64, 2)
    # No initialiser ran: the global RNG was not consumed by kaiming_uniform_ & co.
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.is_meta for p in model.parameters())
    assert model.inv_freq.device.type == "cpu"
    assert torch.equal(model.inv_freq, eager.inv_freq)


def test_empty_init_restores_global_state_even_after_an_error() -> None:
    original = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="boom"), empty_init():
        nn.Linear(2, 2)
        raise RuntimeError("boom")
    assert nn.Module.register_parameter is original
    assert torch._C._len_torch_function_stack() == 0
    lin = nn.Linear(3, 3)
    assert not lin.weight.is_meta and lin.weight.abs().sum() > 0
    assert (lin(torch.ones(1, 3)) == lin(torch.ones(1, 3))).all()  # torch still works


def test_empty_init_only_affects_the_calling_thread() -> None:
    inside, built_outside, done = threading.Event(), threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def worker() -> None:
        with empty_init():
            inside.set()
            assert built_outside.wait(10)
            result["worker"] = nn.Linear(4, 4)
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    result["main"] = nn.Linear(4, 4)  # built while the other thread is inside empty_init
    built_outside.set()
    t.join(10)
    assert done.is_set()
    assert not result["main"].weight.is_meta and result["main"].weight.abs().sum() > 0
    assert result["worker"].weight.is_meta


def test_overlapping_empty_init_blocks_in_two_threads() -> None:
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    out: dict[str, Any] = {}

    def a() -> None:
        with empty_init():
            a_in.set()
            assert b_in.wait(10)
        a_out.set()

    t = threading.Thread(target=a)
    t.start()
    assert a_in.wait(10)
    with empty_init():
        b_in.set()
        assert a_out.wait(10)  # the other block has exited: ours must still be in force
        out["b"] = nn.Linear(2, 2)
    t.join(10)
    assert out["b"].weight.is_meta
    assert not nn.Linear(2, 2).weight.is_meta


def test_entering_and_leaving_never_breaks_another_threads_construction() -> None:
    start = threading.Barrier(2)
    stop = threading.Event()
    errors: list[BaseException] = []
    built: list[bool] = []

    def builder() -> None:
        start.wait(10)
        try:
            while not stop.is_set():
                built.append(nn.Linear(2, 2).weight.is_meta)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=builder)
    t.start()
    start.wait(10)
    for _ in range(300):
        with empty_init():
            assert nn.Linear(2, 2).weight.is_meta
    stop.set()
    t.join(10)
    assert errors == [] and built and not any(built)


def test_construct_and_load_import_no_meta_kernels() -> None:
    # A first computation on meta tensors imports hundreds of modules (~0.5 s): empty_init avoids it.
    code = """
import sys, tempfile, torch, fastinfer
from fastinfer import testing
path = testing.save_checkpoint(testing.RotaryMLP(64, 2), tempfile.mkdtemp() + "/c.pt")
before = set(sys.modules)
model = fastinfer.load_model(testing.RotaryMLP, path, 64, 2)
print(sorted(set(sys.modules) - before))
"""
    added = run_python(code).stdout.strip()
    assert len(eval(added)) < 15, added


# --------------------------------------------------------------------------------------------
# Bit-for-bit equality across formats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, shards",
    [("torch", None), ("safetensors", None), ("torch", 2), ("safetensors", 3)],
    ids=["torch", "safetensors", "torch-sharded", "safetensors-sharded"],
)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_eager_bit_for_bit(
    case: str, fmt: str, shards: int | None, tmp_path: Path
) -> None:
    cls, kwargs, make_input = CASES[case]
    eager = _eager(cls, **kwargs)
    ckpt = testing.save_checkpoint(eager, tmp_path / "ckpt", format=fmt, shards=shards)  # type: ignore[arg-type]
    reports: list[LoadReport] = []
    model = load_model(cls, ckpt, on_report=reports.append, **kwargs)
    assert not model.training
    inputs = make_input()
    assert torch.equal(_run(model, inputs), _run(eager, inputs))
    for (name, p), (_, q) in zip(
        model.named_parameters(remove_duplicate=False),
        eager.named_parameters(remove_duplicate=False),
    ):
        assert not p.is_meta, name
        assert p.requires_grad == q.requires_grad, name
    for name, b in model.named_buffers():
        assert not b.is_meta, name
    report = reports[0]
    assert report.bytes_copied == 0 and report.bytes_mapped > 0
    assert report.keys_loaded > 0


def test_tied_weights_are_one_parameter_again(tmp_path: Path) -> None:
    eager = _eager(Tied)
    for fmt in ("torch", "safetensors"):
        path = save_weights(eager, tmp_path / f"tied.{fmt}", format=fmt)
        if fmt == "safetensors":  # the alias is written once
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                assert "head.weight" not in set(f.keys())
        model = load_model(Tied, path)
        assert model.head.weight is model.embed.weight
        assert len(list(model.parameters())) == len(list(eager.parameters()))


def test_parametrizations_and_requires_grad(tmp_path: Path) -> None:
    eager = _eager(Parametrized)
    model = load_model(Parametrized, testing.save_checkpoint(eager, tmp_path / "p.pt"))
    assert parametrize.is_parametrized(model.a, "weight")
    assert torch.equal(model.a.weight, eager.a.weight)
    assert (
        not model.frozen.weight.requires_grad
        and model.a.parametrizations.weight.original.requires_grad
    )
    assert model.steps.dtype == torch.int64 and int(model.steps) == 3


def test_zero_copy_weights_are_views_of_the_file(tmp_path: Path) -> None:
    eager = _eager(testing.RotaryMLP, 256, 2)
    for fmt in ("torch", "safetensors"):
        path = testing.save_checkpoint(eager, tmp_path / f"z.{fmt}", format=fmt)
        reports: list[LoadReport] = []
        model = load_model(testing.RotaryMLP, path, 256, 2, on_report=reports.append)
        ptr = model.layers[0].weight.data_ptr()
        maps = Path("/proc/self/maps").read_text().splitlines()
        owners = [
            line.split()[-1]
            for line in maps
            if int(line.split()[0].split("-")[0], 16)
            <= ptr
            < int(line.split()[0].split("-")[1], 16)
        ]
        assert owners == [str(path)], owners
        r = reports[0]
        assert r.bytes_copied == 0
        assert r.bytes_mapped == sum(p.numel() * 4 for p in eager.parameters())
        assert "map" in str(r) and "first touch" in str(r)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_mmap_false_reads_into_memory(fmt: str, tmp_path: Path) -> None:
    eager = _eager(testing.RotaryMLP, 64, 2)
    path = testing.save_checkpoint(eager, tmp_path / f"n.{fmt}", format=fmt)  # type: ignore[arg-type]
    reports: list[LoadReport] = []
    model = load_model(testing.RotaryMLP, path, 64, 2, mmap=False, on_report=reports.append)
    x = torch.randn(2, 64)
    assert torch.equal(_run(model, x), _run(eager, x))
    assert reports[0].bytes_mapped == 0 and reports[0].bytes_copied > 0
    assert any("mmap=False" in n for n in reports[0].notes)


def test_dtype_is_applied_tensor_by_tensor(tmp_path: Path) -> None:
    eager = _eager(Parametrized)
    path = testing.save_checkpoint(eager, tmp_path / "d.safetensors", format="safetensors")
    with empty_init():
        model = Parametrized()
    report = load_weights_(model, path, dtype=torch.bfloat16)
    ref = _eager(Parametrized).to(torch.bfloat16)
    assert model.a.parametrizations.weight.original.dtype == torch.bfloat16
    assert model.steps.dtype == torch.int64  # integer tensors keep their dtype
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(_run(model, x), _run(ref, x))
    assert report.bytes_mapped == 8  # only the int64 buffer stays mapped
    assert report.bytes_copied == sum(
        p.numel() * 2 for p in ref.state_dict().values() if p.is_floating_point()
    )
    assert report.dtype == "torch.bfloat16"


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_load_pretrained_matches_from_pretrained(which: str, tmp_path: Path) -> None:
    import transformers

    model = testing.hf_bert() if which == "bert" else testing.hf_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModel if which == "bert" else transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(tmp_path).eval()
    reports: list[LoadReport] = []
    fast = fastinfer.load_pretrained(tmp_path, on_report=reports.append)
    assert type(fast) is type(ref)
    ids, mask = testing.text_batch(batch_size=2, seq_len=10)
    with torch.inference_mode():
        a = fast(input_ids=ids, attention_mask=mask)
        b = ref(input_ids=ids, attention_mask=mask)
    key = "last_hidden_state" if which == "bert" else "logits"
    assert torch.equal(a[key], b[key])
    if which == "llama":
        assert fast.lm_head.weight is fast.model.embed_tokens.weight
        assert reports[0].keys_tied == 1
    assert not any(t.is_meta for t in [*fast.parameters(), *fast.buffers()])
    assert reports[0].bytes_copied == 0


@pytest.mark.transformers
def test_load_pretrained_in_bfloat16_matches_from_pretrained(tmp_path: Path) -> None:
    import transformers

    testing.hf_llama().save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    reports: list[LoadReport] = []
    fast = fastinfer.load_pretrained(tmp_path, dtype=torch.bfloat16, on_report=reports.append)
    for (name, a), (_, b) in zip(fast.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype, name
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        assert a.dtype == b.dtype, name  # rotary inv_freq stays fp32, as in transformers
    ids = torch.randint(1, 1000, (1, 9))
    with torch.inference_mode():
        assert torch.equal(fast(ids).logits, ref(ids).logits)
    assert reports[0].bytes_mapped == 0 and reports[0].bytes_copied > 0  # fp32 file -> bf16


# Tiny configs: (model class, config class, config kwargs). Each builds a tensor in the default
# dtype or in float32 on purpose, which from_pretrained keeps as built under the model's dtype.
_BUILT_IN_DTYPE = {
    # sinusoidal position tables, non-persistent, made in the default dtype
    "xglm": (
        "XGLMForCausalLM",
        "XGLMConfig",
        {"d_model": 32, "num_layers": 1, "attention_heads": 2, "ffn_dim": 64},
    ),
    "m2m_100": (
        "M2M100ForConditionalGeneration",
        "M2M100Config",
        {
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
        },
    ),
    # the causal mask ``attn.bias``, non-persistent
    "openai-gpt": (
        "OpenAIGPTLMHeadModel",
        "OpenAIGPTConfig",
        {"n_embd": 32, "n_layer": 1, "n_head": 2},
    ),
    # a float32 sinusoidal table whose values _init_weights recomputes after the build
    "gptj": (
        "GPTJForCausalLM",
        "GPTJConfig",
        {"n_embd": 32, "n_layer": 1, "n_head": 2, "rotary_dim": 8},
    ),
    # parameters made in float32 on purpose (q_bias, v_bias) stay float32
    "deberta": (
        "DebertaModel",
        "DebertaConfig",
        {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    ),
    # rotary inv_freq stays float32
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    ),
}


@pytest.mark.transformers
@pytest.mark.parametrize("how", ["bf16-folder", "dtype-argument"])
@pytest.mark.parametrize("arch", list(_BUILT_IN_DTYPE))
def test_load_pretrained_builds_tensors_in_the_dtype_from_pretrained_gives_them(
    arch: str, how: str, tmp_path: Path
) -> None:
    import transformers

    model_name, config_name, kwargs = _BUILT_IN_DTYPE[arch]
    cls = getattr(transformers, model_name)
    config = getattr(transformers, config_name)(
        vocab_size=100, max_position_embeddings=64, **kwargs
    )
    with testing.seeded(0):
        eager = cls(config).eval()
    if how == "bf16-folder":
        eager.to(torch.bfloat16).save_pretrained(tmp_path)
        options: dict[str, Any] = {}
    else:
        eager.save_pretrained(tmp_path)
        options = {"dtype": torch.bfloat16}
    ref = cls.from_pretrained(tmp_path, **options).eval()
    fast = fastinfer.load_pretrained(tmp_path, **options)
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    got = {**dict(fast.named_parameters()), **dict(fast.named_buffers())}
    assert got.keys() == want.keys()
    wrong = [
        f"{k}: {got[k].dtype} vs {want[k].dtype}" for k in want if got[k].dtype != want[k].dtype
    ]
    assert not wrong, wrong
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if arch == "m2m_100":
        inputs["decoder_input_ids"] = ids[:, :4]
    try:
        with torch.inference_mode():
            expected = ref(**inputs)[0]
    except RuntimeError:  # DeBERTa mixes float32 and bfloat16 weights: transformers' fails too
        return
    with torch.inference_mode():
        assert torch.equal(fast(**inputs)[0], expected)


@pytest.mark.transformers
def test_load_pretrained_restores_the_default_dtype_when_the_build_fails(tmp_path: Path) -> None:
    import transformers

    testing.hf_llama(hidden_size=32, num_hidden_layers=1, intermediate_size=64).save_pretrained(
        tmp_path
    )
    seen: list[torch.dtype] = []

    class Broken(transformers.LlamaForCausalLM):  # type: ignore[misc]
        def __init__(self, config: Any) -> None:
            seen.append(torch.get_default_dtype())
            raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        fastinfer.load_pretrained(tmp_path, model_class=Broken, dtype=torch.bfloat16)
    assert seen == [torch.bfloat16]  # built under the model's dtype, as from_pretrained builds
    assert torch.get_default_dtype() == torch.float32
    assert torch.ones(1).dtype == torch.float32


@pytest.mark.transformers
def test_hf_llama_from_a_torch_checkpoint_with_both_tied_keys(tmp_path: Path) -> None:
    ref = testing.hf_llama()
    path = testing.save_checkpoint(ref, tmp_path / "llama.pt")
    model = load_model(type(ref), path, ref.config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(1, 1000, (1, 9))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.transformers
def test_hf_tie_is_not_forced_when_the_checkpoint_holds_different_values(tmp_path: Path) -> None:
    ref = testing.hf_llama()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0  # a checkpoint trained untied
    path = testing.save_checkpoint(sd, tmp_path / "untied.safetensors", format="safetensors")
    reports: list[LoadReport] = []
    model = load_model(type(ref), path, ref.config, on_report=reports.append)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    assert any("left untied" in n for n in reports[0].notes)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _mlp_ckpt(tmp_path: Path, sd_transform: Any = None, name: str = "m.pt") -> Path:
    sd = _eager(testing.TinyMLP).state_dict()
    if sd_transform:
        sd = sd_transform(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_prefixed_keys_get_a_hint_and_strip_prefix_fixes_them(prefix: str, tmp_path: Path) -> None:
    path = _mlp_ckpt(tmp_path, lambda sd: {prefix + k: v for k, v in sd.items()})
    with pytest.raises(StateDictMismatch) as err:
        load_model(testing.TinyMLP, path)
    msg = str(err.value)
    assert "missing from the checkpoint (6)" in msg and "unexpected in the checkpoint (6)" in msg
    assert "head.weight" in msg and f"{prefix}head.weight" in msg
    assert f"strip_prefix={prefix!r}" in msg
    model = load_model(testing.TinyMLP, path, strip_prefix=prefix)
    x = torch.randn(2, 32)
    assert torch.equal(_run(model, x), _run(_eager(testing.TinyMLP), x))


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = testing.TinyMLP()


def test_a_checkpoint_of_a_submodule_gets_a_hint(tmp_path: Path) -> None:
    path = _mlp_ckpt(tmp_path)
    with pytest.raises(
        StateDictMismatch, match=r"model keys start with 'model\.'.*load_weights_\(model\.model"
    ):
        load_model(_Wrapper, path)


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = dict(sd)
        del sd["head.bias"]
        sd["extra.weight"] = torch.zeros(2)
        return sd

    path = _mlp_ckpt(tmp_path, edit)
    with pytest.raises(
        StateDictMismatch,
        match=r"(?s)missing from the checkpoint \(1\).*head\.bias.*unexpected in the checkpoint \(1\).*extra\.weight",
    ):
        load_model(testing.TinyMLP, path)
    # strict=False ignores the unexpected key, but a parameter left on meta is still an error.
    with pytest.raises(
        StateDictMismatch,
        match=r"(?s)still on the meta device.*parameter 'head\.bias' \(not in the checkpoint\)",
    ):
        load_model(testing.TinyMLP, path, strict=False)
    # Into a real (eager) model, strict=False keeps what the checkpoint lacks and reports it.
    model = _eager(testing.TinyMLP, seed=1)
    report = load_weights_(model, path, strict=False)
    assert report.missing_keys == ("head.bias",) and report.unexpected_keys == ("extra.weight",)


def test_shape_and_dtype_mismatch_name_the_key_and_both(tmp_path: Path) -> None:
    path = _mlp_ckpt(tmp_path, lambda sd: {**sd, "head.weight": torch.zeros(8, 65)})
    with pytest.raises(
        StateDictMismatch, match=r"head\.weight: checkpoint \(8, 65\) vs model \(8, 64\)"
    ):
        load_model(testing.TinyMLP, path)
    path = _mlp_ckpt(tmp_path, lambda sd: {k: v.half() for k, v in sd.items()}, "h.pt")
    with pytest.raises(
        StateDictMismatch,
        match=r"(?s)checkpoint dtype torch\.float16 vs model dtype torch\.float32.*pass dtype=",
    ):
        load_model(testing.TinyMLP, path)
    assert load_model(testing.TinyMLP, path, dtype=torch.float16).head.weight.dtype == torch.float16


def test_a_buffer_left_on_meta_is_named(tmp_path: Path) -> None:
    # The plain recipe: construct under torch.device("meta") -> the computed buffer is meta too.
    path = testing.save_checkpoint(_eager(testing.RotaryMLP, 64, 2), tmp_path / "r.pt")
    with torch.device("meta"):
        model = testing.RotaryMLP(64, 2)
    with pytest.raises(
        StateDictMismatch, match=r"buffer 'inv_freq' \(non-persistent buffer.*empty_init"
    ):
        load_weights_(model, path)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_name_the_file(fmt: str, damage: str, tmp_path: Path) -> None:
    path = testing.save_checkpoint(_eager(testing.TinyMLP), tmp_path / f"c.{fmt}", format=fmt)  # type: ignore[arg-type]
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "garbage":
        path.write_bytes(data[:8] + os.urandom(len(data) - 8))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_model(testing.TinyMLP, path)
    assert str(path) in str(err.value)
    # No raw zip/pickle/safetensors traceback attached.
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_missing_file_and_bad_shard_index(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(testing.TinyMLP, tmp_path / "nope.pt")
    folder = testing.save_checkpoint(_eager(testing.TinyMLP), tmp_path / "sh", shards=2)
    index = folder / "pytorch_model.bin.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["head.bias"] = "gone.bin"
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"gone\.bin"):
        load_model(testing.TinyMLP, folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(testing.TinyMLP, tmp_path / "empty")


def test_torchscript_archive_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_eager(testing.TinyMLP)), str(path))
    with pytest.raises(CheckpointError, match=r"TorchScript archive.*torch\.jit\.load"):
        load_model(testing.TinyMLP, path)


def test_legacy_torch_save_loads_without_mmap(tmp_path: Path) -> None:
    eager = _eager(testing.TinyMLP)
    path = tmp_path / "legacy.pt"
    torch.save(eager.state_dict(), path, _use_new_zipfile_serialization=False)
    reports: list[LoadReport] = []
    model = load_model(testing.TinyMLP, path, on_report=reports.append)
    x = torch.randn(2, 32)
    assert torch.equal(_run(model, x), _run(eager, x))
    assert "legacy" in " ".join(reports[0].notes) and reports[0].bytes_mapped == 0
    assert reports[0].bytes_copied > 0


def test_wrapped_state_dict_is_unwrapped(tmp_path: Path) -> None:
    eager = _eager(testing.TinyMLP)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": eager.state_dict()}, path)
    reports: list[LoadReport] = []
    load_model(testing.TinyMLP, path, on_report=reports.append)
    assert any("state_dict" in n for n in reports[0].notes)


class _Payload:
    """Unpickling this writes a file: the classic malicious-checkpoint payload."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self) -> Any:
        return (Path.write_text, (Path(self.target), "pwned"))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_not_executed(container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    sd: dict[str, Any] = dict(_eager(testing.TinyMLP).state_dict())
    sd["evil"] = _Payload(str(marker))
    path = tmp_path / "evil.pt"
    if container == "zip":
        torch.save(sd, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"trust_pickle=True") as err:
        load_model(testing.TinyMLP, path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "the payload ran"
    # The payload is real: a full unpickle (explicitly trusted) does run it.
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(testing.TinyMLP, path, trust_pickle=True)
    assert marker.read_text() == "pwned"


def test_plain_pickle_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"w": _Payload(str(marker))}))
    with pytest.raises((UnsafeCheckpointError, CheckpointError)):
        load_model(testing.TinyMLP, path)
    assert not marker.exists()


def test_bad_options(tmp_path: Path) -> None:
    path = _mlp_ckpt(tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        load_model(testing.TinyMLP, path, dtype="half")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device"):
        load_model(testing.TinyMLP, path, device="warp-drive")
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        load_weights_("model", path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# save_weights, progress, memory
# --------------------------------------------------------------------------------------------


def test_save_weights_replaces_the_file_without_breaking_a_mapped_reader(tmp_path: Path) -> None:
    path = tmp_path / "live.safetensors"
    first = _eager(testing.TinyMLP, seed=0)
    save_weights(first, path)
    model = load_model(testing.TinyMLP, path)
    x = torch.randn(2, 32)
    before = _run(model, x)
    save_weights(_eager(testing.TinyMLP, seed=1), path)  # overwrite while `model` maps the old file
    assert torch.equal(_run(model, x), before)  # the old inode lives on: no SIGBUS, no torn weights
    assert [p.name for p in tmp_path.iterdir()] == ["live.safetensors"]  # no temp files left
    assert not torch.equal(_run(load_model(testing.TinyMLP, path), x), before)


def test_save_weights_refuses_meta_and_bad_format(tmp_path: Path) -> None:
    with empty_init():
        model = testing.TinyMLP()
    with pytest.raises(fastinfer.LoadError, match="meta"):
        save_weights(model, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="format"):
        save_weights(_eager(testing.TinyMLP), tmp_path / "m.x", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_only_when_asked_or_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = testing.save_checkpoint(
        _eager(testing.TinyMLP), tmp_path / "sh", format="safetensors", shards=3
    )
    load_model(testing.TinyMLP, folder)  # stderr is not a terminal here: silent
    assert capsys.readouterr().err == ""
    os.environ["FASTINFER_PROGRESS"] = "1"
    load_model(testing.TinyMLP, folder)
    assert "3/3" in capsys.readouterr().err
    load_model(testing.TinyMLP, folder, progress=False)
    assert capsys.readouterr().err == ""


def test_report_memory_fields_are_plausible(tmp_path: Path) -> None:
    path = testing.save_checkpoint(_eager(testing.RotaryMLP, 512, 4), tmp_path / "big.pt")
    reports: list[LoadReport] = []
    load_model(testing.RotaryMLP, path, 512, 4, on_report=reports.append)
    r = reports[0]
    size = path.stat().st_size
    assert r.shared_bytes >= r.bytes_mapped  # the mapped weights are resident, file-backed
    assert r.private_added_bytes < size // 4  # ...and not copied into private memory
    assert r.private_bytes > 0 and r.pss_bytes > 0


@pytest.mark.gpu
def test_load_to_cuda(tmp_path: Path) -> None:
    eager = _eager(testing.RotaryMLP, 64, 2)
    path = testing.save_checkpoint(eager, tmp_path / "g.pt")
    reports: list[LoadReport] = []
    model = load_model(testing.RotaryMLP, path, 64, 2, device="cuda", on_report=reports.append)
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    x = torch.randn(2, 64)
    torch.testing.assert_close(_run(model, x.cuda()).cpu(), _run(eager, x))
    assert reports[0].bytes_copied > 0 and reports[0].bytes_mapped == 0
