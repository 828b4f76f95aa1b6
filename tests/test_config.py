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

    shipped = Path(__file__).resolve().parents[1] / "config" / "unet_cpu_pairs.yaml"
    out = subprocess.run([sys.executable, "-m", "thinslice.config", str(shipped)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed == load_config(shipped).model_dump(mode="json")
    assert printed["unet_train"]["final_step_fraction"] == yaml.safe_load(shipped.read_text())["unet_train"]["final_step_fraction"]
    assert printed["interpolate"]["adapt_steps"] == 600  # a default the file does not set, filled in
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  cond_imag: true\n")
    out = subprocess.run([sys.executable, "-m", "thinslice.config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "unet.cond_imag: unknown key" in out.stderr and out.stdout == ""
