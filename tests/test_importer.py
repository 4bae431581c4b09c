"""Tests for etbert_jax.importer: numerical parity with a PyTorch UER BERT and strict key checks.

The reference model (tests/uer_reference.py) is randomly initialized, saved with torch.save in
ET-BERT's state-dict layout, imported into a real orbax checkpoint and restored into the NNX
model, whose outputs must then match the reference.
"""

import hashlib
import json
import logging
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import uer_reference  # noqa: E402

from etbert_jax import checkpoint, importer  # noqa: E402
from etbert_jax import config as config_lib  # noqa: E402
from etbert_jax import main as cli  # noqa: E402
from etbert_jax.heads import MASKED_LOGIT, PretrainModel  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[SEP]", "[CLS]", "[UNK]", "[MASK]"]
TINY = uer_reference.UerConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                               intermediate_size=128, max_positions=64)

# Outputs must agree to 1e-5 of the largest reference magnitude of each output.
RELATIVE_TOLERANCE = 1e-5


def _write_vocab(path: pathlib.Path, size: int) -> pathlib.Path:
    tokens = SPECIAL_TOKENS + [f"{index:04x}" for index in range(size - len(SPECIAL_TOKENS))]
    path.write_text("\n".join(tokens) + "\n")
    return path


def _save_state_dict(state: dict, path: pathlib.Path) -> pathlib.Path:
    torch.save(state, path)
    return path


def _restore(out_dir: pathlib.Path, scan_layers: bool = True) -> tuple[config_lib.Config, PretrainModel]:
    """Restore the imported checkpoint the way fine-tuning reads pre-trained weights."""
    import dataclasses

    from flax import nnx

    checkpointer = checkpoint.Checkpointer(out_dir / checkpoint.CHECKPOINT_SUBDIR, save_every=1,
                                           keep=1, async_save=False)
    try:
        config = config_lib.config_from_dict(checkpointer.read_config())
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, scan_layers=scan_layers))
        model = PretrainModel(config.model, rngs=nnx.Rngs(123))
        step = checkpointer.latest_step()
        state = checkpointer.restore_model(step, model_target=checkpoint.abstract_state(nnx.state(model)))
    finally:
        checkpointer.close()
    nnx.update(model, state)
    return config, model


def _assert_close(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RELATIVE_TOLERANCE,
                               atol=RELATIVE_TOLERANCE * scale, err_msg=f"{name} differs")


@pytest.fixture(scope="module")
def reference_model():
    return uer_reference.build_reference(TINY, seed=7)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, reference_model):
    folder = tmp_path_factory.mktemp("import")
    weights = _save_state_dict(reference_model.state_dict(), folder / "pretrained_model.bin")
    vocab = _write_vocab(folder / "vocab.txt", TINY.vocab_size)
    result = importer.import_etbert(weights, vocab, folder / "out", num_heads=TINY.num_heads)
    return result, vocab


@pytest.fixture()
def tiny_files(tmp_path, reference_model):
    state = {name: value.clone() for name, value in reference_model.state_dict().items()}
    vocab = _write_vocab(tmp_path / "vocab.txt", TINY.vocab_size)
    return state, vocab, tmp_path


@pytest.mark.parametrize("scan_layers", [True, False])
def test_parity_with_uer_reference(imported, reference_model, scan_layers):
    result, _ = imported
    _, model = _restore(result.out_dir, scan_layers=scan_layers)

    rng = np.random.default_rng(0)
    ids = rng.integers(len(SPECIAL_TOKENS), TINY.vocab_size, size=(3, 24))
    ids[:, 0] = 2
    segments = np.ones_like(ids)
    segments[:, 12:] = 2
    ids[2, 18:] = 0  # the last example ends in padding
    segments[2, 18:] = 0
    real = ids != 0

    with torch.no_grad():
        hidden, mlm, nsp = (t.numpy() for t in reference_model(torch.tensor(ids), torch.tensor(segments)))
    positions = jnp.tile(jnp.arange(ids.shape[1])[None, :], (ids.shape[0], 1))
    jax_hidden = np.asarray(model.encoder(jnp.asarray(ids), jnp.asarray(segments), deterministic=True))
    jax_mlm, jax_sbp = model(jnp.asarray(ids), jnp.asarray(segments), positions, deterministic=True)
    jax_mlm, jax_sbp = np.asarray(jax_mlm), np.asarray(jax_sbp)

    _assert_close("encoder output", jax_hidden[real], hidden[real])
    _assert_close("MBM logits", jax_mlm[..., :TINY.vocab_size][real], mlm[real])
    _assert_close("SBP logits", jax_sbp, nsp)
    assert np.all(jax_mlm[..., TINY.vocab_size:] == MASKED_LOGIT)


def test_config_from_shapes(imported):
    result, vocab = imported
    config = config_lib.config_from_dict(result.config)
    model = config.model

    assert (model.vocab_size, model.hidden_size, model.num_layers) == (300, 64, 2)
    assert (model.num_heads, model.intermediate_size, model.max_positions) == (4, 128, 64)
    assert model.type_vocab_size == 3
    assert model.padded_vocab_size == 384
    assert model.layer_norm == "uer"
    assert model.layer_norm_eps == 1e-6
    assert model.tie_mlm_decoder is False
    assert model.attention_dropout == 0.1
    assert config.tokenizer["vocab_kind"] == "wordpiece"
    assert config.tokenizer["vocab_size"] == 300
    assert config.tokenizer["vocab_sha256"] == hashlib.sha256(vocab.read_bytes()).hexdigest()
    assert config.tokenizer["header_policy"] == "etbert"
    assert config.data.seq_len <= model.max_positions


def test_every_tensor_mapped(imported, reference_model):
    result, _ = imported
    report = json.loads((result.out_dir / "import_report.json").read_text())

    assert sorted(result.mapped) == sorted(reference_model.state_dict())
    assert report["mapped"] == list(result.mapped)
    assert report["unused"] == []


def test_padding_rows_are_zero(imported, reference_model):
    result, _ = imported
    _, model = _restore(result.out_dir)
    table = np.asarray(model.encoder.embeddings.word.embedding[...])
    decoder = np.asarray(model.mbm.decoder.kernel[...])
    reference_table = reference_model.state_dict()["embedding.word_embedding.weight"].numpy()

    assert table.shape == (384, 64)
    assert np.array_equal(table[:300], reference_table)
    assert not np.any(table[300:])
    assert decoder.shape == (64, 384)
    assert not np.any(decoder[:, 300:])


def test_missing_tensor_named(tiny_files):
    state, vocab, folder = tiny_files
    del state["encoder.transformer.1.layer_norm_2.beta"]
    weights = _save_state_dict(state, folder / "missing.bin")

    with pytest.raises(importer.WeightImportError, match=r"encoder\.transformer\.1\.layer_norm_2\.beta"):
        importer.import_etbert(weights, vocab, folder / "out", num_heads=4)
    assert not (folder / "out" / checkpoint.CHECKPOINT_SUBDIR).exists()


def test_missing_layer_named(tiny_files):
    state, vocab, folder = tiny_files
    for name in [key for key in state if key.startswith("encoder.transformer.0.")]:
        del state[name]
    weights = _save_state_dict(state, folder / "no-layer-0.bin")

    with pytest.raises(importer.WeightImportError, match=r"encoder\.transformer\.0\."):
        importer.import_etbert(weights, vocab, folder / "out", num_heads=4)


def test_extra_tensor_reported_unused(tiny_files, caplog):
    state, vocab, folder = tiny_files
    state["encoder.margin_V"] = torch.ones(64, 1)
    weights = _save_state_dict(state, folder / "extra.bin")

    with caplog.at_level(logging.WARNING, logger="etbert_jax.importer"):
        result = importer.import_etbert(weights, vocab, folder / "out", num_heads=4)
    report = json.loads((folder / "out" / "import_report.json").read_text())

    assert result.unused == ("encoder.margin_V",)
    assert report["unused"] == ["encoder.margin_V"]
    assert "encoder.margin_V" not in result.mapped
    assert any("encoder.margin_V" in record.getMessage() for record in caplog.records)


def test_wrong_shape_names_both(tiny_files):
    state, vocab, folder = tiny_files
    state["target.nsp_linear_1.weight"] = torch.zeros(64, 32)
    weights = _save_state_dict(state, folder / "shape.bin")

    with pytest.raises(importer.WeightImportError) as error:
        importer.import_etbert(weights, vocab, folder / "out", num_heads=4)
    message = str(error.value)
    assert "target.nsp_linear_1.weight" in message
    assert "(64, 32)" in message
    assert "(64, 64)" in message


def test_vocab_size_mismatch(tiny_files):
    state, _, folder = tiny_files
    weights = _save_state_dict(state, folder / "weights.bin")
    short_vocab = _write_vocab(folder / "short-vocab.txt", 299)

    with pytest.raises(importer.WeightImportError, match="299 tokens.*300 rows"):
        importer.import_etbert(weights, short_vocab, folder / "out", num_heads=4)


def test_heads_must_divide_hidden(tiny_files):
    state, vocab, folder = tiny_files
    weights = _save_state_dict(state, folder / "weights.bin")

    with pytest.raises(importer.WeightImportError, match="--heads 5"):
        importer.import_etbert(weights, vocab, folder / "out", num_heads=5)


def test_default_heads_from_hidden():
    dims = importer.UerDimensions(vocab_size=300, hidden_size=768, num_layers=1,
                                  intermediate_size=3072, max_positions=512, type_vocab_size=3)
    assert importer.build_config(dims, None, {}).model.num_heads == 12
    odd = importer.UerDimensions(vocab_size=300, hidden_size=100, num_layers=1,
                                 intermediate_size=64, max_positions=64, type_vocab_size=3)
    with pytest.raises(importer.WeightImportError, match="pass --heads"):
        importer.build_config(odd, None, {})


class _NotATensor:
    """A class that weights-only loading must refuse to rebuild."""


def test_pickled_object_rejected(tmp_path):
    weights = tmp_path / "object.bin"
    torch.save({"embedding.word_embedding.weight": _NotATensor()}, weights)

    with pytest.raises(importer.WeightImportError, match="weights-only"):
        importer.load_state_dict(weights)


def test_existing_checkpoint_rejected(imported, tiny_files):
    result, _ = imported
    state, vocab, folder = tiny_files
    weights = _save_state_dict(state, folder / "weights.bin")

    with pytest.raises(FileExistsError, match="already contains a checkpoint"):
        importer.import_etbert(weights, vocab, result.out_dir, num_heads=4)


@pytest.mark.slow
def test_cli_with_etbert_vocab(tmp_path, etbert_vocab_path):
    size = sum(1 for _ in etbert_vocab_path.open())
    config = uer_reference.UerConfig(vocab_size=size, hidden_size=32, num_layers=1, num_heads=2,
                                     intermediate_size=64, max_positions=32)
    reference = uer_reference.build_reference(config, seed=3)
    weights = _save_state_dict(reference.state_dict(), tmp_path / "pretrained_model.bin")
    out = tmp_path / "imported"

    status = cli.main(["import-etbert", str(weights), "--vocab", str(etbert_vocab_path),
                       "--out", str(out), "--heads", "2"])
    restored_config, model = _restore(out)

    assert status == 0
    assert restored_config.model.vocab_size == size == config_lib.ETBERT_VOCAB_SIZE
    assert restored_config.model.padded_vocab_size == 60_032
    assert restored_config.tokenizer["vocab_sha256"] == hashlib.sha256(
        etbert_vocab_path.read_bytes()).hexdigest()
    table = np.asarray(model.encoder.embeddings.word.embedding[...])
    expected = reference.state_dict()["embedding.word_embedding.weight"].numpy()
    assert np.array_equal(table[:size], expected)


def test_non_mapping_file_rejected(tmp_path):
    weights = _save_state_dict(torch.zeros(3), tmp_path / "tensor.bin")

    with pytest.raises(importer.WeightImportError, match="expected a state dict"):
        importer.load_state_dict(weights)


def test_wrapped_names_hint(tiny_files):
    state, vocab, folder = tiny_files
    wrapped = {f"module.{name}": value for name, value in state.items()}
    weights = _save_state_dict(wrapped, folder / "wrapped.bin")

    with pytest.raises(importer.WeightImportError, match=r"module\.state_dict\(\)"):
        importer.import_etbert(weights, vocab, folder / "out", num_heads=4)


def test_finetune_restores_imported_encoder(imported, reference_model):
    """`etbert finetune --init` loads encoder and pooler from an imported checkpoint."""
    from etbert_jax import finetune, sharding

    result, _ = imported
    config = config_lib.config_from_dict(result.config)
    mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1))
    classifier, _ = finetune.build_classifier(config, 3, mesh)
    finetune.load_pretrained_encoder(classifier, str(result.out_dir), mesh)

    ids = np.random.default_rng(1).integers(len(SPECIAL_TOKENS), TINY.vocab_size, size=(8, 16))
    ids[:, 0] = 2
    segments = np.ones_like(ids)
    with torch.no_grad():
        hidden, _, _ = reference_model(torch.tensor(ids), torch.tensor(segments))
        pooled = torch.tanh(reference_model.target.nsp_linear_1(hidden[:, 0])).numpy()
    jax_pooled = classifier.encode(jnp.asarray(ids), jnp.asarray(segments), deterministic=True)

    _assert_close("pooled [CLS] features", np.asarray(jax_pooled), pooled)
