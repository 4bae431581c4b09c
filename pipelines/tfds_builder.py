"""TFDS builder over a labeled capture tree, made with the same Beam transforms as `etbert convert-finetune`.

Build (Apache Beam, DirectRunner by default; other flags go to Beam):

    python -m pipelines.build_tfds ROOT --data_dir ~/tensorflow_datasets --level flow \
        [--split auto|capture|session|packet] [conversion flags of convert-finetune] \
        [--direct_num_workers=2 --direct_running_mode=multi_processing]

ROOT contains one folder per class (`ROOT/<class>/**/*.pcap`). The dataset is `etbert_traffic` with
one config per level, `etbert_traffic/packet` and `etbert_traffic/flow`. Load it with

    tfds.load("etbert_traffic/flow", data_dir=DATA_DIR)        # after `import pipelines.tfds_builder`
    tfds.builder_from_directory(DATA_DIR + "/etbert_traffic/flow/1.0.0")

or fine-tune on it with `etbert finetune --data tfds:etbert_traffic` (default data directory) or
`--data DATA_DIR`.

Splits, examples and their order of preference when deduplicating are those of the conversion
job: the same capture units, the same split policy and seed, the same `ReadFinetuneFn`,
`assign_splits` and `deduplicate` steps. Both levels are read, as the conversion does, so that a
session split sees the same sessions; the level of the config is kept afterwards. The split
counts therefore equal the `examples_per_split` of the conversion's manifest for the same input
and settings.

Features: `input_ids` ([CLS] + tokens, int64, unpadded), `label` (ClassLabel, sorted folder names),
`source`, `session` (text, never fed to the model) and `packet_index` (int64, -1 at flow level).
The dataset metadata (`metadata.json`) carries the manifest facts fine-tuning checks: level,
sequence length, tokenizer block, split section, conversion options and labels.

`tfds build pipelines/tfds_builder.py --manual_dir ROOT --config flow` works as well where the
`tfds` command starts; the tfds 4.9.10 command imports `mlcroissant`, which requirements.txt does
not install.

NOTE: the conversion options are builder arguments, not part of the config name (the level), so
two builds with different options into one data directory overwrite each other.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import tensorflow_datasets as tfds

from etbert_jax import convert
from etbert_jax.tokenizer import Vocab

log = logging.getLogger(__name__)

DATASET_NAME = "etbert_traffic"


# tfds.core.BuilderConfig is a non-frozen dataclass, so subclasses cannot be frozen.
@dataclasses.dataclass
class TrafficConfig(tfds.core.BuilderConfig):
    """One level of the traffic dataset."""

    # "packet" or "flow".
    level: str = "flow"


def _level_config(level: str) -> TrafficConfig:
    return TrafficConfig(name=level, level=level, description=f"{level}-level examples of a labeled capture tree")


def _example(item) -> tuple[str, dict[str, Any]]:
    label, _, example = item
    return example.uid, {"input_ids": example.input_ids, "label": int(label), "source": example.source,
                         "session": example.session, "packet_index": int(example.packet_index)}


def _keep(level: str, split: str):
    def keep(item) -> bool:
        _, item_split, example = item
        return example.level == level and item_split == split
    return keep


class EtbertTraffic(tfds.core.GeneratorBasedBuilder):
    """Packet- or flow-level examples of a labeled capture tree, tokenized as etbert-jax trains on them."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [_level_config("packet"), _level_config("flow")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass a labeled capture tree (ROOT/<class>/*.pcap) as --manual_dir."

    def __init__(self, *, root: str = "", split_policy: str = "auto", settings: dict | None = None, **kwargs):
        """Create the builder; `root` defaults to the manual directory, `settings` to ConvertSettings()'s.

        `split_policy` is auto, capture, session or packet (as `etbert convert-finetune --split`);
        `settings` contains keyword arguments of convert.ConvertSettings.
        """
        self.root = root
        self.split_policy = split_policy
        self.settings = dict(settings or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        import tensorflow as tf

        from pipelines import inputs

        # Class names come from the tree when its root is known here. Otherwise _split_generators
        # sets them from the manual directory, or a prepared dataset's dataset_info restores them.
        names = sorted(inputs.list_labeled_tree(self.root)) if self.root else None
        features = tfds.features.FeaturesDict({
            "input_ids": tfds.features.Sequence(tf.int64),
            "label": tfds.features.ClassLabel(names=names),
            "source": tfds.features.Text(),
            "session": tfds.features.Text(),
            "packet_index": tf.int64,
        })
        return self.dataset_info_from_configs(features=features, supervised_keys=("input_ids", "label"),
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager, pipeline):
        import apache_beam as beam

        from pipelines import convert_finetune, inputs, splits, transforms

        config = self.builder_config
        root = self.root or str(dl_manager.manual_dir)
        settings = convert.ConvertSettings(**self.settings)
        vocab = Vocab.load(settings.vocab)

        # NOTE: these planning steps repeat the opening of convert_finetune.run, which does not
        # expose them as a function; both must change together.
        tree = inputs.list_labeled_tree(root)
        labels = {name: index for index, name in enumerate(sorted(tree))}
        label_feature = self.info.features["label"]
        if label_feature.num_classes is None:
            label_feature.names = sorted(tree)
        elif list(label_feature.names) != sorted(tree):
            raise ValueError(f"the classes under {root} are {sorted(tree)}, but this dataset was defined with "
                             f"{list(label_feature.names)}; use a new data directory")
        units, path_of = convert_finetune.capture_units(tree, settings.series)
        units_per_class = {label: sum(1 for unit in units if unit.label == label) for label in labels}
        policy, warning = splits.choose_policy(self.split_policy, units_per_class)
        if warning:
            log.warning("%s", warning)
        assignment = splits.assign_capture_splits(units, settings.seed) if policy == "capture" else {}
        elements = [(unit.key, [path_of[name] for name in unit.paths], list(unit.paths), labels[unit.label],
                     assignment.get(unit.key)) for unit in units]

        seq_len = settings.packet_seq_len if config.level == "packet" else settings.flow_seq_len
        self.info.metadata.update({
            "kind": "finetune",
            "level": config.level,
            "seq_len": seq_len,
            "labels": labels,
            "tokenizer": settings.tokenizer_block(vocab),
            "config": dict(dataclasses.asdict(settings), root=root, split=self.split_policy),
            "split": {"policy": policy, "requested": self.split_policy, "warning": warning, "seed": settings.seed,
                      "fractions": list(splits.DEFAULT_FRACTIONS), "units_per_class": units_per_class,
                      "files_per_split": splits.files_per_split(units, assignment) if policy == "capture" else None},
        })
        log.info("building %s/%s from %d capture files of %d classes, split by %s", DATASET_NAME, config.level,
                 len(path_of), len(labels), policy)

        items = (pipeline
                 | "CaptureUnits" >> beam.Create(elements)
                 | "ReadExamples" >> beam.ParDo(transforms.ReadFinetuneFn(settings, False))
                 | "Examples" >> beam.FlatMap(transforms.only("example")))
        assigned = items if policy == "capture" else convert_finetune.assign_splits(items, policy, settings.seed)
        kept = (assigned
                | "KeyByContent" >> beam.Map(lambda item: ((item[2].level, convert.content_digest(
                    item[2].input_ids)), item))
                | "GroupCopies" >> beam.GroupByKey()
                | "Deduplicate" >> beam.FlatMap(transforms.deduplicate)
                | "Kept" >> beam.FlatMap(transforms.only("example")))
        return {split: (kept
                        | f"Keep{split.title()}" >> beam.Filter(_keep(config.level, split))
                        | f"ToFeatures{split.title()}" >> beam.Map(_example))
                for split in splits.SPLITS}

    def _generate_examples(self, **kwargs):
        # Every split is produced in _split_generators from one shared Beam graph.
        raise NotImplementedError("EtbertTraffic builds all splits in _split_generators")
