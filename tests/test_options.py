"""Command-line options as fairseq-train parses them: presets fill only what was not typed, and every value the
model, task or criterion cannot use is refused with its valid range before anything heavy is built."""

import pytest
from console import REPO, random_letters_data_bin
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_expire  # noqa: F401  (registers the models, task and criterion)
from fairseq_expire.errors import UsageError


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return random_letters_data_bin(tmp_path_factory.mktemp("options"))


def parsed(data, arch, *extra):
    """The whole configuration of ``fairseq-train DATA --arch ARCH ... EXTRA``, as fairseq-train resolves it."""
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [str(data), "--user-dir", str(REPO / "fairseq_expire"), "--task", "language_modeling_with_memory"]
        + ["--arch", arch, "--criterion", "expire_span_cross_entropy", "--tokens-per-sample", "16"]
        + ["--batch-size", "4", *map(str, extra)],
    )
    return convert_namespace_to_omegaconf(args)


def build(cfg):
    """What fairseq-train does first: the task, then the model, then the criterion."""
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return model, task.build_criterion(cfg.criterion)


@pytest.mark.parametrize(
    "arch, typed, expected",
    [
        (
            "expire_span_lm_enwik8",
            ("--dropout", 0, "--attention-dropout", 0),
            dict(dropout=0, attention_dropout=0),
        ),
        (
            "expire_span_lm_tiny",
            ("--max-span", 0, "--expire-span-ramp", 0),
            dict(max_span=0, expire_span_ramp=0),
        ),
        (
            "expire_span_lm_collision",
            ("--expire-span-init-percentage", 0),
            dict(expire_span_init_percentage=0),
        ),
        ("expire_span_lm_wt103", ("--embedding-dropout", 0), dict(embedding_dropout=0)),
        ("expire_span_lm_enwik8", ("--no-expire-span-noisy",), dict(expire_span_noisy=False)),
        (
            "expire_span_lm_collision",
            ("--no-decoder-normalize-before",),
            dict(decoder_normalize_before=False),
        ),
    ],
)
def test_every_value_typed_on_the_command_line_wins_over_the_preset(data_bin, arch, typed, expected):
    model_cfg = parsed(data_bin, arch, *typed).model
    assert {name: model_cfg[name] for name in expected} == expected


def test_a_preset_fills_what_was_not_typed(data_bin):
    model_cfg = parsed(data_bin, "expire_span_lm_enwik8", "--dropout", 0).model
    assert model_cfg.attention_dropout == 0.3 and model_cfg.expire_span_noisy and model_cfg.max_span == 16384
    assert parsed(data_bin, "expire_span_lm_collision").model.decoder_normalize_before


@pytest.mark.parametrize(
    "typed, refused",
    [
        (("--expire-span-ramp", 0), "--expire-span-ramp 0: must be an integer >= 1"),
        (("--expire-span-ramp", -8), "--expire-span-ramp -8: must be an integer >= 1"),
        (
            ("--expire-span-init-percentage", 0),
            "--expire-span-init-percentage 0.0: must be strictly between 0 and 1",
        ),
        (("--expire-span-init-percentage", 1), "--expire-span-init-percentage 1.0: must be strictly between"),
        (
            ("--expire-span-init-percentage", 1.5),
            "--expire-span-init-percentage 1.5: must be strictly between",
        ),
        (("--expire-span-init-percentage", -0.5), "--expire-span-init-percentage -0.5: must be strictly"),
        (("--expire-span-pre-div", 0), "--expire-span-pre-div 0.0: must be > 0"),
        (("--max-span", 0), "--max-span 0: must be an integer >= 1"),
        (("--dropout", 1), r"--dropout 1.0: must be in \[0, 1\)"),
        (("--decoder-layers", 0), "--decoder-layers 0: must be an integer >= 1"),
        (
            ("--decoder-attention-heads", 3),
            "--decoder-embed-dim 32 is not divisible by --decoder-attention-heads 3",
        ),
        (("--tokens-per-sample", 0), "--tokens-per-sample 0: must be an integer >= 1"),
        (("--tokens-per-sample", -5), "--tokens-per-sample -5: must be an integer >= 1"),
        (("--batch-size", 0), "--batch-size 0: must be an integer >= 1"),
        (("--batch-size", -3), "--batch-size -3: must be an integer >= 1"),
        (("--expire-span-alpha", -1), "--expire-span-alpha -1.0: must be >= 0"),
        (("--tokens-per-sample", 100_000_000, "--max-span", 100_000_000), "larger than the split 'train'"),
        (("--batch-size-valid", 500), "streams over the .* usable tokens of split 'valid'"),
    ],
)
def test_a_value_the_run_cannot_use_is_refused_with_its_valid_range(data_bin, typed, refused):
    with pytest.raises(UsageError, match=refused):
        build(parsed(data_bin, "expire_span_lm_tiny", *typed))


def test_a_model_of_another_plugin_is_refused_by_name(data_bin):
    with pytest.raises(
        UsageError, match="--arch transformer_lm reads the task option 'max_target_positions'"
    ):
        build(parsed(data_bin, "transformer_lm", "--decoder-layers", 1, "--decoder-embed-dim", 8))


def test_the_fixed_span_model_has_no_expire_span_options_to_check(data_bin):
    model, criterion = build(parsed(data_bin, "fixed_span_lm_tiny", "--max-span", 16))
    assert model.decoder.rule.max_span == 16 and not model.decoder.rule.learned and criterion.alpha == 0


@pytest.mark.parametrize("arch", ["expire_span_lm_tiny", "adaptive_span_lm_tiny"])
def test_attention_kernel_option_reaches_every_layer(data_bin, arch):
    model, _ = build(parsed(data_bin, arch, "--attention-kernel", "plain"))
    assert {layer.attention.kernel for layer in model.decoder.layers} == {"plain"}
    model, _ = build(parsed(data_bin, arch))
    assert {layer.attention.kernel for layer in model.decoder.layers} == {"fused"}
    with pytest.raises(SystemExit):
        parsed(data_bin, arch, "--attention-kernel", "flash")
