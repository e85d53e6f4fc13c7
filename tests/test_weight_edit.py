"""The weight-edit math, the streaming checkpoint editor and its in-memory twin.

The family matrix checks the edit against an independent oracle: the unedited model with
forward hooks that apply h <- h - s r r^T h to the o_proj output and the whole MLP block
output of each planned layer. Logits of the edited checkpoint must match it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

from pipeline.architectures import decoder_layers, get_architecture, residual_writers
from pipeline.checkpoint_copy import edit_checkpoint
from pipeline.errors import PipelineError
from pipeline.stages.ablate import model_card
from pipeline.weight_edit import (
    apply_plan_in_memory,
    direction_for,
    directions_for_method,
    norm_preserving,
    orthogonalize,
)

HIDDEN = 64
BASE = dict(
    hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=96,
)
ROUTED = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
              first_k_dense_replace=1, n_group=1, topk_group=1)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": dict(sliding_window=8),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "glm4_moe": ROUTED,
    "deepseek_v3": dict(ROUTED, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}
SHARDED = {"llama", "mixtral", "gpt_oss"}  # saved in several shards to exercise the index path


def tiny_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_type == "gemma3":
        config = Gemma3Config(
            text_config=dict(BASE, sliding_window=8, vocab_size=100),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, boi_token_index=97, eoi_token_index=98, image_token_index=99,
        )
    else:
        config = AutoConfig.for_model(model_type, **{**BASE, **FAMILIES[model_type]})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases so the bias edits matter (gpt-oss o_proj.bias, down_proj_bias)
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and "e_score_correction" not in name:
                parameter.normal_(0.0, 0.5)
    return model


def save(model: torch.nn.Module, directory: Path, sharded: bool) -> Path:
    model.save_pretrained(directory, max_shard_size="60KB" if sharded else "50GB")
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    return directory


def sha256s(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(path))
    return tensors


def plan_for(layers: list[dict[str, Any]], method: str = "orthogonal") -> dict[str, Any]:
    return {"model": "tiny/test", "method": method, "layers": layers}


def project_out(output: Any, direction: torch.Tensor, scale: float) -> Any:
    hidden = output[0] if isinstance(output, tuple) else output
    projected = hidden - scale * (hidden @ direction).unsqueeze(-1) * direction
    return (projected, *output[1:]) if isinstance(output, tuple) else projected


def hooked_logits(model: torch.nn.Module, input_ids: torch.Tensor, edits: dict[int, tuple[torch.Tensor, float, float]]) -> torch.Tensor:
    """Logits of the unedited model with the direction projected out of each edited module's output."""
    handles = []
    layers = decoder_layers(model)
    for layer, (direction, attn_scale, mlp_scale) in edits.items():
        handles.append(layers[layer].self_attn.o_proj.register_forward_hook(
            lambda _m, _i, out, d=direction, s=attn_scale: project_out(out, d, s)))
        handles.append(layers[layer].mlp.register_forward_hook(
            lambda _m, _i, out, d=direction, s=mlp_scale: project_out(out, d, s)))
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def along(tensor: torch.Tensor, direction: torch.Tensor, axis: int) -> torch.Tensor:
    return tensor.to(torch.float32).movedim(axis, -1) @ direction


# --- the math ----------------------------------------------------------------------------------


def test_orthogonalize_removes_the_component_and_keeps_the_rest() -> None:
    torch.manual_seed(1)
    weight, direction = torch.randn(HIDDEN, 32), torch.randn(HIDDEN)
    unit = direction / direction.norm()
    edited = orthogonalize(weight, direction, 1.0, 0)
    assert (unit @ edited).norm() / (unit @ weight).norm() < 1e-6
    other = torch.linalg.qr(torch.stack([unit, torch.randn(HIDDEN)], 1))[0][:, 1]  # orthogonal to r
    torch.testing.assert_close(other @ edited, other @ weight, atol=1e-5, rtol=0)
    half = orthogonalize(weight, direction, 0.5, 0)
    torch.testing.assert_close(unit @ half, 0.5 * (unit @ weight), atol=1e-5, rtol=0)


def test_orthogonalize_other_axes_bias_and_dtype() -> None:
    torch.manual_seed(2)
    direction = torch.randn(HIDDEN)
    unit = direction / direction.norm()
    experts = torch.randn(4, 32, HIDDEN).to(torch.bfloat16)  # gpt-oss layout: hidden last
    edited = orthogonalize(experts, direction, 1.0, 2)
    assert edited.dtype == torch.bfloat16 and edited.shape == experts.shape
    assert along(edited, unit, 2).abs().max() < 0.05 * along(experts, unit, 2).abs().max()  # bf16 rounding only
    bias = torch.randn(HIDDEN)
    torch.testing.assert_close(orthogonalize(bias, direction, 1.0, 0), bias - (unit @ bias) * unit)


def test_norm_preserving_full_scale_removes_direction_and_keeps_column_norms() -> None:
    torch.manual_seed(3)
    weight, direction = torch.randn(4, HIDDEN, 32), torch.randn(HIDDEN)
    unit = direction / direction.norm()
    edited = norm_preserving(weight, direction, 1.0, 1)
    assert along(edited, unit, 1).norm() / along(weight, unit, 1).norm() < 1e-6
    torch.testing.assert_close(edited.norm(dim=1), weight.norm(dim=1))


def test_norm_preserving_scale_interpolates() -> None:
    torch.manual_seed(4)
    weight, direction = torch.randn(HIDDEN, 16), torch.randn(HIDDEN)
    unit = direction / direction.norm()
    assert torch.equal(norm_preserving(weight, direction, 0.0, 0), weight)
    half, full = norm_preserving(weight, direction, 0.5, 0), norm_preserving(weight, direction, 1.0, 0)
    assert (half - full).abs().max() > 0.01
    torch.testing.assert_close(half.norm(dim=0), weight.norm(dim=0))
    cosine_before = (unit @ weight) / weight.norm(dim=0)
    cosine_half = (unit @ half) / half.norm(dim=0)
    assert torch.all(cosine_half.abs() < cosine_before.abs())  # halfway: component shrunk, not removed
    assert cosine_half.abs().min() > 0


def test_direction_for_interpolates_fractional_layers() -> None:
    directions = torch.zeros(4, 3)
    directions[1, 0], directions[2, 1] = 2.0, 5.0
    torch.testing.assert_close(direction_for(directions, 1), torch.tensor([1.0, 0.0, 0.0]))
    blended = direction_for(directions, 1.25)  # 0.75 * (2,0,0) + 0.25 * (0,5,0) = (1.5, 1.25, 0)
    torch.testing.assert_close(blended, torch.tensor([1.5, 1.25, 0.0]) / torch.tensor([1.5, 1.25]).norm())
    with pytest.raises(PipelineError):
        direction_for(directions, 3.5)
    with pytest.raises(PipelineError):
        direction_for(directions, 0)  # all-zero row


def test_directions_for_method_picks_biprojected_for_norm_preserving() -> None:
    measurements = {"refusal_direction": torch.ones(2, 3), "biprojected_direction": torch.zeros(2, 3)}
    assert directions_for_method(measurements, "orthogonal") is measurements["refusal_direction"]
    assert directions_for_method(measurements, "norm_preserving") is measurements["biprojected_direction"]
    with pytest.raises(PipelineError):
        directions_for_method({"refusal_direction": torch.ones(2, 3)}, "norm_preserving")


# --- the family matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", [*FAMILIES, "gemma3"])
def test_edited_checkpoint_matches_hooked_model(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type)
    source = save(model, tmp_path / "source", sharded=model_type in SHARDED)
    before = sha256s(source)
    if model_type in SHARDED:
        assert len(list(source.glob("*.safetensors"))) >= 3
    torch.manual_seed(5)
    directions = torch.randn(3, HIDDEN)
    # Layer 0 is dense in glm4_moe / deepseek_v3 / qwen3_moe, layer 2 routed: both code paths are edited.
    plan = plan_for([
        {"layer": 0, "direction_from": 0.4, "scale": 1.0},
        {"layer": 2, "direction_from": 2, "scale": 1.0, "attn_scale": 0.5, "mlp_scale": 0.75},
    ])
    r0, r2 = direction_for(directions, 0.4), direction_for(directions, 2)

    report = edit_checkpoint(source, tmp_path / "out", plan, directions, progress=False, card=partial(model_card, plan, {}))

    assert sha256s(source) == before
    assert report["source"] == str(source.resolve())
    assert report["source_files"] == before
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert (out / "chat_template.jinja").exists() and (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "tiny/test" in card and "orthogonal" in card and "| 2 | 2 | 0.5 | 0.75 |" in card

    input_ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(6))
    expected = hooked_logits(model, input_ids, {0: (r0, 1.0, 1.0), 2: (r2, 0.5, 0.75)})
    edited_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(edited_model, input_ids)
    assert (got - logits(model, input_ids)).abs().max() > 1e-3  # the edit changed something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    source_tensors, out_tensors = read_all(source), read_all(out)
    assert source_tensors.keys() == out_tensors.keys()
    arch, edited = get_architecture(model.config.model_type), set(report["edited_tensors"])
    components = set()
    for name in edited:
        match = residual_writers(arch, name, 3, "disk")
        direction, scale = (r0, 1.0) if match.layer == 0 else (r2, {"attn": 0.5, "mlp": 0.75}[match.component])
        ratio = along(out_tensors[name], direction, match.hidden_axis).norm() / along(source_tensors[name], direction, match.hidden_axis).norm()
        assert abs(ratio - (1 - scale)) < 1e-4, name
        components.add((match.layer, match.component))
    assert components == {(0, "attn"), (0, "mlp"), (2, "attn"), (2, "mlp")}
    for name in source_tensors.keys() - edited:
        a, b = source_tensors[name], out_tensors[name]
        assert a.dtype == b.dtype and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8)), name
    with safe_open(next(out.glob("*.safetensors")), "pt") as reader:
        assert reader.metadata() == {"format": "pt"}

    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    handle = apply_plan_in_memory(model, plan, directions)
    torch.testing.assert_close(logits(model, input_ids), got, atol=1e-5, rtol=0)
    handle.restore()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, snapshot[name]), name


def test_norm_preserving_in_memory_equals_checkpoint_for_fused_experts(tmp_path: Path) -> None:
    """Per-expert columns on disk are the fused tensor's columns in memory: both spellings edit alike."""
    model = tiny_model("glm4_moe")
    source = save(model, tmp_path / "source", sharded=False)
    torch.manual_seed(7)
    directions = torch.randn(3, HIDDEN)
    plan = plan_for([{"layer": 1, "direction_from": 1, "scale": 1.0}, {"layer": 2, "direction_from": 1.5, "scale": 0.6}],
                    method="norm_preserving")
    report = edit_checkpoint(source, tmp_path / "out", plan, directions, progress=False)
    out_tensors, source_tensors = read_all(tmp_path / "out"), read_all(source)
    r1 = direction_for(directions, 1)
    expert = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert expert in report["edited_tensors"]
    assert (r1 @ out_tensors[expert]).norm() / (r1 @ source_tensors[expert]).norm() < 1e-4
    torch.testing.assert_close(out_tensors[expert].norm(dim=0), source_tensors[expert].norm(dim=0))

    input_ids = torch.randint(0, 90, (2, 5), generator=torch.Generator().manual_seed(8))
    edited_logits = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval(), input_ids)
    apply_plan_in_memory(model, plan, directions)
    torch.testing.assert_close(logits(model, input_ids), edited_logits, atol=1e-5, rtol=0)


def test_embedding_edit_on_request(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = save(model, tmp_path / "source", sharded=False)
    directions = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(9))
    plan = plan_for([{"layer": 2, "direction_from": 2, "scale": 1.0}, {"layer": 1, "direction_from": 1, "scale": 1.0}])
    report = edit_checkpoint(source, tmp_path / "out", plan, directions, progress=False, embed=True)
    assert "model.embed_tokens.weight" in report["edited_tensors"]
    assert "lm_head.weight" not in report["edited_tensors"]
    out_tensors = read_all(tmp_path / "out")
    r1 = direction_for(directions, 1)  # the lowest planned layer's direction
    assert (out_tensors["model.embed_tokens.weight"] @ r1).abs().max() < 1e-5
    handle = apply_plan_in_memory(model, plan, directions, embed=True)
    torch.testing.assert_close(model.model.embed_tokens.weight, out_tensors["model.embed_tokens.weight"])
    assert "model.embed_tokens.weight" in handle.edited


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_model("llama"), tmp_path_factory.mktemp("llama"), sharded=False)


def one_layer_plan(layer: int = 1) -> dict[str, Any]:
    return plan_for([{"layer": layer, "direction_from": 1, "scale": 1.0}])


def test_plan_layer_out_of_range(llama_source: Path, tmp_path: Path) -> None:
    plan = plan_for([{"layer": 99, "direction_from": 1, "scale": 1.0}])
    with pytest.raises(PipelineError, match=r"plan layer 99 .* 3 decoder layers"):
        edit_checkpoint(llama_source, tmp_path / "out", plan, torch.randn(3, HIDDEN), progress=False)
    assert not (tmp_path / "out").exists()


def test_bin_only_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(PipelineError, match="never unpickle"):
        edit_checkpoint(tmp_path, tmp_path.parent / "out_bin", one_layer_plan(), torch.randn(3, HIDDEN), progress=False)


def test_quantized_checkpoint_is_refused(llama_source: Path, tmp_path: Path) -> None:
    source = tmp_path / "quantized"
    source.mkdir()
    config = json.loads((llama_source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "mxfp4"})))
    (source / "model.safetensors").write_bytes((llama_source / "model.safetensors").read_bytes())
    with pytest.raises(PipelineError, match="quantized experts not supported; use a bf16 dequantized checkpoint"):
        edit_checkpoint(source, tmp_path / "out", one_layer_plan(), torch.randn(3, HIDDEN), progress=False)


def test_read_only_output_dir(llama_source: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(PipelineError, match="cannot write"):
            edit_checkpoint(llama_source, locked / "model", one_layer_plan(), torch.randn(3, HIDDEN), progress=False)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "point",
    [
        "copy",  # the kernel copy of a shard (source hashes known, as from the model store)
        "copy while hashing",  # the same, with the hash worker reading the source beside it
        "edit",  # an edited tensor written at its range by the edit worker
    ],
)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_write_failures_become_pipeline_errors(
    code: int, point: str, llama_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full, permission denied, read-only file system: the OS call that writes the shard fails, with
    no file name, as a full or read-only disk makes it. A failed overwrite would leave a valid-looking
    shard with unedited weights: it is removed with everything else this call wrote, whichever thread failed."""
    def failing(*_args: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwrite" if point == "edit" else "sendfile", failing)
    known = sha256s(llama_source) if point != "copy while hashing" else None
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=os.strerror(code)) as raised:
        edit_checkpoint(llama_source, out, one_layer_plan(), torch.randn(3, HIDDEN), progress=False, source_hashes=known)
    assert f"cannot write {out / 'model.safetensors'}: " in str(raised.value) and "\n" not in str(raised.value)
    assert not out.exists()


def test_an_interrupted_copy_stops_its_workers_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the kernel copy of the second shard: the edit and hash workers stop and are joined
    before the partial output is removed, so no thread writes into a directory after it is gone."""
    import threading

    source = save(tiny_model("llama"), tmp_path / "sharded-llama", sharded=True)
    calls = []
    real_sendfile = os.sendfile

    def interrupted(*args: Any) -> int:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sendfile(*args)

    monkeypatch.setattr(os, "sendfile", interrupted)
    out = tmp_path / "out"
    plan = plan_for([{"layer": layer, "direction_from": layer, "scale": 1.0} for layer in range(3)])
    with pytest.raises(KeyboardInterrupt):
        edit_checkpoint(source, out, plan, torch.randn(3, HIDDEN), progress=False)
    assert not out.exists()
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("ablate-")]


def test_known_source_hashes_are_taken_and_output_is_the_same(llama_source: Path, tmp_path: Path) -> None:
    """Hashes passed in (a verified model-store manifest) are not recomputed; files without one are hashed
    beside their copy. Either way the output bytes are the same, and the edited tensor is exactly
    `orthogonalize` of the source tensor: same bytes, in the source's byte range, header untouched."""
    directions = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(11))
    hashed = edit_checkpoint(llama_source, tmp_path / "hashed", one_layer_plan(), directions, progress=False)
    assert hashed["source_files"] == sha256s(llama_source)
    stand_in = "0" * 64  # not config.json's real hash: returned as given proves it was not recomputed
    known = {name: digest for name, digest in hashed["source_files"].items() if name != "tokenizer_config.json"}
    given = edit_checkpoint(
        llama_source, tmp_path / "given", one_layer_plan(), directions, progress=False,
        source_hashes={**known, "config.json": stand_in, "not-copied.bin": stand_in},
    )
    assert given["source_files"] == {**hashed["source_files"], "config.json": stand_in}
    assert sha256s(tmp_path / "given") == sha256s(tmp_path / "hashed")

    shard = "model.safetensors"
    source_bytes, out_bytes = (llama_source / shard).read_bytes(), (tmp_path / "given" / shard).read_bytes()
    header_end = 8 + int.from_bytes(source_bytes[:8], "little")
    assert len(out_bytes) == len(source_bytes) and out_bytes[:header_end] == source_bytes[:header_end]
    name = "model.layers.1.self_attn.o_proj.weight"
    source_tensor = safetensors.torch.load_file(llama_source / shard)[name]
    expected = orthogonalize(source_tensor, direction_for(directions, 1), 1.0, 0)
    assert torch.equal(read_all(tmp_path / "given")[name].view(torch.uint8), expected.view(torch.uint8))
    header = json.loads(source_bytes[8:header_end])
    spans = [range(header_end + header[edited]["data_offsets"][0], header_end + header[edited]["data_offsets"][1])
             for edited in given["edited_tensors"]]
    changed = (torch.frombuffer(bytearray(out_bytes), dtype=torch.uint8)
               != torch.frombuffer(bytearray(source_bytes), dtype=torch.uint8)).nonzero().flatten().tolist()
    assert changed and all(any(i in span for span in spans) for i in changed)  # only the edited tensors' bytes


def test_output_inside_source_is_refused(llama_source: Path) -> None:
    with pytest.raises(PipelineError, match="inside the source"):
        edit_checkpoint(llama_source, llama_source / "edited", one_layer_plan(), torch.randn(3, HIDDEN), progress=False)


def test_duplicate_plan_layer_is_refused(llama_source: Path, tmp_path: Path) -> None:
    plan = plan_for([{"layer": 1, "direction_from": 1, "scale": 1.0}, {"layer": 1, "direction_from": 2, "scale": 0.5}])
    with pytest.raises(PipelineError, match="layer 1 twice"):
        edit_checkpoint(llama_source, tmp_path / "out", plan, torch.randn(3, HIDDEN), progress=False)


# --- the stage -----------------------------------------------------------------------------------


def run_ablate_stage(tmp_path: Path, model_cfg: dict[str, Any], run_name: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run the ablate stage on `model_cfg` with a one-layer norm_preserving plan (layer 1) and random
    measurements of a 3-layer, HIDDEN-wide model; returns (its context, the measured direction tables)."""
    from pipeline.plan import write_plan
    from pipeline.stage import StageContext
    from pipeline.stages.ablate import STAGE
    from pipeline.measurement import (
        COPIED_METADATA, DIRECTION_TENSORS, STATISTIC_TENSORS, Measurements, read_measurements, write_measurements,
    )

    measure_dir, select_dir, out_dir = tmp_path / "measure", tmp_path / "select", tmp_path / run_name
    out_dir.mkdir()
    if not measure_dir.exists():
        measure_dir.mkdir()
        select_dir.mkdir()
        generator = torch.Generator().manual_seed(10)
        tensors = {name: torch.randn(3, HIDDEN, generator=generator) for name in DIRECTION_TENSORS}
        tensors.update({name: torch.rand(3, generator=generator, dtype=torch.float64) for name in STATISTIC_TENSORS})
        meta = {key: "x" for key in COPIED_METADATA} | {"hidden_size": str(HIDDEN), "num_layers": "3", "formula_version": "1"}
        write_measurements(measure_dir / "measurements.safetensors", Measurements(meta=meta, tensors=tensors))
        write_plan(select_dir / "ablation.yaml", {
            "model": "tiny", "model_fingerprint": "x", "hidden_size": HIDDEN, "num_layers": 3,
            "source_measurement": "x", "mode": "balanced", "method": "norm_preserving", "direction_source": "own",
            "thresholds": {"min_quality": 0.0, "top_n": 1, "relative_min": 0.0, "skip_first": 0.0, "skip_last": 0.0},
            "layers": [{"layer": 1, "direction_from": 1, "scale": 1.0}],
        })
    ctx = StageContext(
        config={"model": model_cfg, "ablate": {"embed": {"enabled": False}}, "export": {"format": "safetensors"}},
        out_dir=out_dir, inputs={"select": select_dir, "measure": measure_dir},
        model_store=tmp_path / "store", seed=0, progress=False,
    )
    STAGE.run(ctx)
    return ctx, read_measurements(measure_dir / "measurements.safetensors").tensors


def test_ablate_stage_edits_the_resolved_checkpoint(tmp_path: Path) -> None:
    arch = {k: v for k, v in {**BASE, **ROUTED}.items() if k not in ("vocab_size", "n_group", "topk_group")}
    arch["model_type"] = "glm4_moe"
    model_cfg = {"name": "tiny_stage", "source": "tiny", "id": "tiny-glm", "revision": None, "tiny": {"seed": 0}, "arch": arch}
    ctx, tensors = run_ablate_stage(tmp_path, model_cfg, "out")
    out_dir = ctx.out_dir

    source_dir = Path(ctx.manifest_extra["source"]["dir"])
    source_files = ctx.manifest_extra["source"]["files"]
    assert "model.safetensors" in source_files  # from the model store's verified manifest, not hashed again
    assert source_files == {name: hashlib.sha256((source_dir / name).read_bytes()).hexdigest() for name in source_files}
    assert ctx.manifest_extra["edited_tensors"] == 1 + 4 + 1  # o_proj, 4 experts, shared expert of layer 1
    # Every file written was hashed by the stage, after it was complete: the manifest takes these as they are.
    assert ctx.written_hashes == {f"model/{name}": digest for name, digest in sha256s(out_dir / "model").items()}
    edited, source = read_all(out_dir / "model"), read_all(source_dir)
    biprojected = direction_for(tensors["biprojected_direction"], 1)  # norm_preserving uses the biprojected table
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert (biprojected @ edited[name]).norm() < 1e-4 * (biprojected @ source[name]).norm()
    assert torch.equal(edited["model.layers.2.self_attn.o_proj.weight"], source["model.layers.2.self_attn.o_proj.weight"])
    assert (out_dir / "model" / "tokenizer_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out_dir / "model")


def test_local_source_hashes_are_remembered_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local checkpoint is hashed on its first ablate; the next ablate (a sweep's next point) takes the
    remembered sums, and a rewritten file, even with the same size, is hashed again."""
    import pipeline.checkpoint_copy

    source_dir = save(tiny_model("llama"), tmp_path / "local-llama", sharded=True)
    model_cfg = {"name": "local_llama", "source": "local", "id": str(source_dir), "revision": None}
    hashed: list[str] = []
    real_sha256 = pipeline.checkpoint_copy.sha256_file

    def counting_sha256(path: Path) -> str:
        if Path(path).parent == source_dir:  # the stage also hashes what it writes, for its manifest
            hashed.append(Path(path).name)
        return real_sha256(path)

    monkeypatch.setattr(pipeline.checkpoint_copy, "sha256_file", counting_sha256)

    first, _ = run_ablate_stage(tmp_path, model_cfg, "first")
    truth = sha256s(source_dir)
    assert first.manifest_extra["source"]["files"] == truth
    assert sorted(hashed) == sorted(truth)  # every file once

    hashed.clear()
    second, _ = run_ablate_stage(tmp_path, model_cfg, "second")
    assert hashed == []
    assert second.manifest_extra["source"]["files"] == truth
    assert sha256s(second.out_dir / "model") == sha256s(first.out_dir / "model")

    template = source_dir / "chat_template.jinja"
    template.write_text("{{ message }}s")  # same size, new bytes
    third, _ = run_ablate_stage(tmp_path, model_cfg, "third")
    assert hashed == ["chat_template.jinja"]
    assert third.manifest_extra["source"]["files"] == sha256s(source_dir) != truth


def test_a_source_rewritten_during_the_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.stages.ablate

    source_dir = save(tiny_model("llama"), tmp_path / "local-llama", sharded=False)
    model_cfg = {"name": "local_llama", "source": "local", "id": str(source_dir), "revision": None}
    real_edit = pipeline.stages.ablate.edit_checkpoint

    def edit_then_rewrite(*args: Any, **kwargs: Any) -> dict[str, Any]:
        report = real_edit(*args, **kwargs)
        (source_dir / "tokenizer_config.json").write_text('{"model_max_length": 256}')
        return report

    monkeypatch.setattr(pipeline.stages.ablate, "edit_checkpoint", edit_then_rewrite)
    with pytest.raises(PipelineError, match="changed while it was read .tokenizer_config.json"):
        run_ablate_stage(tmp_path, model_cfg, "out")
