"""Forge starts with our extension and makes a real picture through its own API (proves the harness on Forge).

No ``override_settings``: the test checkpoint's text encoder has a non-zero final LayerNorm bias, so Forge's default
"Original" emphasis does not divide 0 by 0 (an all-black image otherwise).
"""

from __future__ import annotations

import host_harness as hh


def test_forge_txt2img_with_our_extension(forge: hh.Host) -> None:
    assert "sdconcepts" in hh.config_labels(forge), "our tab is missing: the extension did not load in Forge"
    # Only this request's part of the log: the host may be shared with tests that provoke errors on purpose.
    logged_before = len(forge.log_text())
    image, info = hh.txt2img(forge)
    assert image.shape == (64, 64, 3)
    hh.assert_finite_picture(image)
    assert "Seed: 42" in info and f"Model: {hh.CHECKPOINT_NAME}" in info, info
    assert "Traceback" not in forge.log_text()[logged_before:], forge.log_tail()
    # Our setting on Forge's Settings page (host.a1111.on_ui_settings; the page's ids are "setting_<key>"), off by
    # default (/sdapi/v1/options lists only saved settings).
    settings = {c.get("props", {}).get("elem_id"): c.get("props", {}) for c in forge.request("/config")["components"]}
    assert settings["setting_sdconcepts_convert_sd1_on_sdxl"].get("value") is False
