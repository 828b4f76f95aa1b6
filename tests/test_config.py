import pytest
import yaml

from thinslice.config import ConfigError, load_config, parse_config


def test_defaults_match_the_conventions():
    cfg = parse_config({}).data
    assert cfg.hu_window == (-1024.0, 2048.0)
    assert (cfg.thick.slab_thickness_mm, cfg.thick.slab_spacing_mm) == (5.0, 5.0)


def test_misspelled_key_is_an_error_that_names_it():
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"thick": {"slab_thicknes_mm": 3}}}, "x.yaml")
    msg = str(e.value)
    assert "data.thick.slab_thicknes_mm: unknown key" in msg
    assert "did you mean 'slab_thickness_mm'" in msg


def test_unknown_section_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="datta: unknown key"):
        parse_config({"datta": {}})
    with pytest.raises(ConfigError, match="slab_spacing_mm"):
        parse_config({"data": {"thick": {"slab_spacing_mm": -1}}})
    with pytest.raises(ConfigError, match="hu_window"):
        parse_config({"data": {"hu_window": [100, -100]}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "config").glob("*.yaml")):
        load_config(path)
        assert yaml.safe_load(path.read_text())


def test_python_m_thinslice_config_prints_the_resolved_config_as_json(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "config" / "cpu.yaml"
    out = subprocess.run([sys.executable, "-m", "thinslice.config", str(shipped)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed == load_config(shipped).model_dump(mode="json")
    # resolved: recipe + size, each from its own file
    recipe = yaml.safe_load((shipped.parent / "recipe.yaml").read_text())
    assert printed["unet_train"]["final_step_fraction"] == recipe["unet_train"]["final_step_fraction"] == 0.5
    assert printed["unet_train"]["max_steps"] == yaml.safe_load(shipped.read_text())["unet_train"]["max_steps"]
    assert printed["interpolate"]["adapt_steps"] == 600  # a default the file does not set, filled in
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  cond_imag: true\n")
    out = subprocess.run([sys.executable, "-m", "thinslice.config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "unet.cond_imag: unknown key" in out.stderr and out.stdout == ""


def test_a_size_file_is_deep_merged_over_its_recipe(tmp_path):
    """`recipe: FILE` (relative to the including file) is merged under the file's own keys, key by key; lists are
    replaced whole; chains are followed; the result is validated as any config."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "recipe.yaml").write_text(
        "unet: {cond_image: true, channel_mult: [1, 2, 4]}\nunet_train: {final_step_fraction: 0.5}\n")
    (tmp_path / "base" / "size.yaml").write_text("recipe: recipe.yaml\nunet: {channel_mult: [1, 2]}\n")
    (tmp_path / "mine.yaml").write_text("recipe: base/size.yaml\nunet_train: {max_steps: 7}\n"
                                        "differs: {unet.cond_image: \"because\"}\nunet: {cond_image: false}\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.unet.channel_mult == (1, 2) and cfg.unet.cond_image is False  # the nearer file wins
    assert cfg.unet_train.final_step_fraction == 0.5 and cfg.unet_train.max_steps == 7  # merged within a section
    (tmp_path / "bad.yaml").write_text("recipe: base/size.yaml\nunet: {cond_imag: true}\n")
    with pytest.raises(ConfigError, match="unet.cond_imag: unknown key"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "base" / "recipe.yaml").write_text("unet: {heads: 0}\n")  # an error set in the recipe says so
    with pytest.raises(ConfigError, match=r"unet.heads.*\(set in .*recipe.yaml\)"):
        load_config(tmp_path / "mine.yaml")
    (tmp_path / "missing.yaml").write_text("recipe: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="recipe: nowhere.yaml not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("recipe: b.yaml\n")
    (tmp_path / "b.yaml").write_text("recipe: a.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "why.yaml").write_text("recipe: base/size.yaml\ndiffers: {unet.cond_imag: x}\n")
    with pytest.raises(ConfigError, match="differs: unet.cond_imag: unknown key"):
        load_config(tmp_path / "why.yaml")
    (tmp_path / "why.yaml").write_text("recipe: base/size.yaml\ndiffers: {unet.cond_image: ''}\n")
    with pytest.raises(ConfigError, match="say why"):
        load_config(tmp_path / "why.yaml")


@pytest.mark.parametrize("old, new", [("unet_train.val_sample_steps", "diffusion.sample_steps"),
                                      ("interpolate.sample_steps", "diffusion.sample_steps"),
                                      ("interpolate.sampler", "diffusion.sampler"),
                                      ("latents.body_threshold_hu", "data.patches.body_threshold_hu")])
def test_a_renamed_knob_is_an_error_that_names_its_one_name(old, new):
    section, key = old.split(".")
    with pytest.raises(ConfigError, match=f"{old}: renamed to {new}"):
        parse_config({section: {key: 1}})


def test_weights_trained_before_a_rename_still_load():
    """A checkpoint stores every key of its day: renamed ones are dropped, their new names are in the dump too."""
    from thinslice.config import Config, from_stored

    stored = Config().model_dump(mode="json")
    stored["unet_train"]["val_sample_steps"] = 25
    stored["interpolate"] |= {"sample_steps": 1, "sampler": None}
    stored["latents"]["body_threshold_hu"] = -500.0
    assert from_stored(stored) == Config()


def test_set_overrides_any_key_over_the_file_and_names_a_wrong_one():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "config" / "cpu.yaml"
    base = load_config(shipped)
    cfg = load_config(shipped, ["interpolate.window=[8, 8, 8]", "unet_train.max_steps=7",
                                "data.split.fixed.some-patient=val", "interpolate.body_margin=null"])
    assert cfg.interpolate.window == (8, 8, 8) and cfg.interpolate.body_margin is None
    assert cfg.unet_train.max_steps == 7 and cfg.data.split.fixed["some-patient"] == "val"
    assert cfg.data.split.fixed["lidc-idri-0314"] == "test"  # a mapping is merged, not replaced
    assert cfg.unet_train.lr == base.unet_train.lr and cfg.unet.model_channels == base.unet.model_channels
    assert load_config(None, ["unet.cond_image=true"]).unet.cond_image is True
    with pytest.raises(ConfigError, match=r"--set interpolate.body_margn: unknown key \(did you mean "
                                          r"'interpolate.body_margin'\?\)"):
        load_config(shipped, ["interpolate.body_margn=3"])
    with pytest.raises(ConfigError, match=r"interpolate.body_margin: .*greater than or equal to 0 \(set by --set\)"):
        load_config(shipped, ["interpolate.body_margin=-1"])
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(shipped, ["body_margin=3"])


def test_every_interpolate_key_can_be_set_from_the_command_line(tmp_path, capsys):
    """Each CLI takes --set; interpolate's reaches keys it has no flag for (issue 24: 10 of 19 were reachable)."""
    from evaluation import interpolate_cli
    from thinslice.config import InterpolateConfig

    for key in InterpolateConfig.model_fields:
        args = interpolate_cli.parse_args(["--input", "x.nii.gz", "--output", str(tmp_path), "--set",
                                           f"interpolate.{key}=oops"])
        assert args.overrides == [f"interpolate.{key}=oops"]
    rc = interpolate_cli.main(["--input", str(tmp_path / "x.nii.gz"), "--output", str(tmp_path / "o"),
                               "--set", "interpolate.encode_overlap=1.5"])
    assert rc == 2 and "interpolate.encode_overlap" in capsys.readouterr().err
