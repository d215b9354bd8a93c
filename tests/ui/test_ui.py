"""Web UI handlers, cards and session on real files and a tiny real model; the layout's scoping rules."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sdconcepts import Embedding, save_embedding
from sdconcepts.generation import SEED_LIMIT, parse_infotext
from sdconcepts.images import read_infotext
from sdconcepts.safe_load import file_sha256
from sdconcepts.ui import handlers
from sdconcepts.ui.cards import format_multiplier, hypernetwork_tag
from sdconcepts.ui.ui_session import DEFAULT_MODEL_LABEL, XL_MODEL_LABEL, UiConfig, UiError, UiSession, scan_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "browser"))
from library_files import write_library  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 48  # the tiny test model's text width


@pytest.fixture()
def library(tmp_path: Path) -> tuple[Path, Path]:
    return write_library(tmp_path, WIDTH)


@pytest.fixture()
def session(library: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path) -> UiSession:
    embeddings, hypernetworks = library
    return UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[embeddings], hypernetworks_dirs=[hypernetworks],
                              outputs_dir=tmp_path / "outputs", device="cpu"))


def _card_names(html: str) -> list[str]:
    return re.findall(r'data-name="([^"]*)"', html)


# -- cards ----------------------------------------------------------------------------------------------------


def test_multiplier_is_written_as_a1111s_javascript_writes_it() -> None:
    assert format_multiplier(1.0) == "1"
    assert format_multiplier(0.75) == "0.75"
    assert format_multiplier(2) == "2"
    assert hypernetwork_tag("style", 1.0) == "<hypernet:style:1>"


def test_embedding_cards_show_details_previews_and_skipped_reasons(session: UiSession, tiny_model_dir: Path) -> None:
    view = handlers.embedding_cards_view(session, model_label=str(tiny_model_dir))
    assert _card_names(view.cards_html) == ["lineart", "toy-style"]
    assert view.summary == "2 of 2 embeddings, 2 skipped"
    toy = view.cards_html[view.cards_html.index('data-name="toy-style"'):]
    assert 'data-prompt="toy-style"' in toy and 'data-allow-negative="1"' in toy
    assert "2 vectors, width 48" in toy
    assert toy.index("data:image/jpeg;base64,") < toy.index("</div></div>")  # the name.png preview, inlined
    lineart = view.cards_html[view.cards_html.index('data-name="lineart"'):view.cards_html.index('data-name="toy-style"')]
    assert "sdconcepts-card-placeholder" in lineart and "<img" not in lineart
    assert "broken.pt" in view.skipped_html
    assert "other-width.safetensors</code>: width 56 does not fit the model&#x27;s 48" in view.skipped_html


def test_hypernetwork_cards_insert_tags_with_the_default_multiplier(library: tuple[Path, Path]) -> None:
    embeddings, hypernetworks = library
    session = UiSession(UiConfig(hypernetworks_dirs=[hypernetworks], multiplier=lambda: 0.5))
    view = handlers.hypernetwork_cards_view(session)
    assert _card_names(view.cards_html) == ["anime-hypernet", "toy-hypernet"]
    assert 'data-prompt="&lt;hypernet:anime-hypernet:0.5&gt;"' in view.cards_html
    assert 'data-allow-negative="0"' in view.cards_html
    assert "widths 48, 32" in view.cards_html and "structure [1, 1.5, 1], relu, layer norm" in view.cards_html
    assert "widths 48</span>" in view.cards_html and "structure [1, 2, 1], linear" in view.cards_html
    assert view.cards_html.count("data:image/jpeg;base64,") == 1  # anime-hypernet.preview.png
    assert "broken-hypernet.pt" in view.skipped_html and view.summary == "2 of 2 hypernetworks, 1 skipped"


def test_search_filters_by_name_folder_and_hash_and_sort_orders(session: UiSession) -> None:
    assert _card_names(handlers.embedding_cards_view(session, "LINE").cards_html) == ["lineart"]
    assert _card_names(handlers.embedding_cards_view(session, "styles").cards_html) == ["lineart"]  # its subfolder
    handlers.embedding_cards_view(session)  # a page shown reads its files: their hashes are known from then on
    toy_hash = next(r.hash for r in session.embeddings.records() if r.name == "toy-style")
    assert toy_hash
    assert _card_names(handlers.embedding_cards_view(session, toy_hash[:8]).cards_html) == ["toy-style"]
    nothing = handlers.embedding_cards_view(session, "no such thing")
    assert _card_names(nothing.cards_html) == [] and "No card matches the search (2 hidden)" in nothing.cards_html
    assert nothing.summary.startswith("0 of 2")

    folder = session.config.hypernetworks_dirs[0]
    os.utime(folder / "toy-hypernet.pt", (1_000_000, 1_000_000))
    os.utime(folder / "anime-hypernet.pt", (2_000_000, 2_000_000))
    assert _card_names(handlers.hypernetwork_cards_view(session, sort="Date").cards_html) == [
        "toy-hypernet", "anime-hypernet"]
    assert _card_names(handlers.hypernetwork_cards_view(session, sort="Date", descending=True).cards_html) == [
        "anime-hypernet", "toy-hypernet"]
    assert _card_names(handlers.hypernetwork_cards_view(session, sort="Name", descending=True).cards_html) == [
        "toy-hypernet", "anime-hypernet"]


def test_new_removed_and_fixed_files_show_up_on_the_next_render(session: UiSession) -> None:
    folder = session.config.embeddings_dirs[0]
    assert "broken.pt" in handlers.embedding_cards_view(session).skipped_html
    save_embedding(Embedding("a&b", torch.ones(1, WIDTH)), folder / "a&b.pt")
    (folder / "styles" / "lineart.safetensors").unlink()
    save_embedding(Embedding("broken", torch.ones(3, WIDTH)), folder / "broken.pt")  # fixed in place
    view = handlers.embedding_cards_view(session)
    assert _card_names(view.cards_html) == ["a&amp;b", "broken", "toy-style"]  # names are escaped
    assert "broken.pt" not in view.skipped_html and "other-width" in view.skipped_html


def test_an_empty_folder_says_what_to_do(tmp_path: Path) -> None:
    view = handlers.hypernetwork_cards_view(UiSession(UiConfig(hypernetworks_dirs=[tmp_path])))
    assert "No hypernetwork files found" in view.cards_html and view.skipped_html == ""


# -- seeds, gallery selection, form values --------------------------------------------------------------------


def test_seed_buttons_and_selected_infotext() -> None:
    assert handlers.random_seed() == -1
    assert handlers.reuse_seed([11, 12], 1) == 12
    assert handlers.reuse_seed([11, 12], None) == 11  # nothing selected: the first image's seed
    assert handlers.reuse_seed([], None, current=5) == 5  # nothing generated yet: keep the field
    assert handlers.selected_infotext(["a", "b"], 1) == "b"
    assert handlers.selected_infotext(["a"], 3) == "" and handlers.selected_infotext([], 0) == ""


def test_form_values_become_generation_params_or_a_clear_error() -> None:
    params = handlers.generation_params("p", "n", "DDIM", 4.0, 6.5, 7.0, 0, 64, 2.0, 3)
    assert (params.steps, params.cfg_scale, params.seed, params.width, params.height) == (4, 6.5, 7, None, 64)
    assert (params.batch_size, params.batch_count, params.sampler) == (2, 3, "DDIM")
    with pytest.raises(UiError, match="unknown sampler 'Nope'"):
        handlers.generation_params("p", "", "Nope", 4, 7, -1, 0, 0, 1, 1)
    with pytest.raises(UiError, match="Steps must be a whole number"):
        handlers.generation_params("p", "", "Euler", 4.5, 7, -1, 0, 0, 1, 1)
    with pytest.raises(UiError, match="Width must be a number"):
        handlers.generation_params("p", "", "Euler", 4, 7, -1, "wide", 0, 1, 1)
    assert handlers.generation_params("p", "", "Euler", 4, 7, 2**32, 0, 0, 1, 1).seed == 2**32  # A1111 writes such seeds
    with pytest.raises(UiError, match=f"at most {SEED_LIMIT}"):
        handlers.generation_params("p", "", "Euler", 4, 7, SEED_LIMIT + 1, 0, 0, 1, 1)


# -- models and generation ------------------------------------------------------------------------------------


def test_model_choices_scan_checkpoints_and_diffusers_folders(tmp_path: Path, tiny_model_dir: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "a.safetensors").write_bytes(b"x")
    (models / "sub" / "b.ckpt").write_bytes(b"x")
    (models / "notes.txt").write_text("not a model")
    (models / ".hidden").mkdir()
    (models / ".hidden" / "c.safetensors").write_bytes(b"x")
    folder = models / "diffusers-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")  # inside a folder model: not listed
    assert scan_models(models) == [models / "a.safetensors", folder, models / "sub" / "b.ckpt"]
    session = UiSession(UiConfig(ckpt=tiny_model_dir, models_dir=models))
    assert list(session.model_choices()) == [
        DEFAULT_MODEL_LABEL, XL_MODEL_LABEL, str(tiny_model_dir), "a.safetensors", "diffusers-model", str(Path("sub") / "b.ckpt")]
    assert session.default_choice() == str(tiny_model_dir)
    assert session.context_width() == WIDTH  # read from the folder's config, nothing loaded
    with pytest.raises(UiError, match="a.safetensors"):
        session.model("a.safetensors")  # a broken checkpoint: one clear line naming the file
    with pytest.raises(UiError, match="no longer available"):
        session.model("gone.safetensors")


def test_generate_applies_embeddings_and_hypernetworks_and_saves_pngs(session: UiSession, tiny_model_dir: Path) -> None:
    label = str(tiny_model_dir)
    calls: list[tuple[int, int]] = []

    def run(prompt: str, negative: str = "", batch: int = 1) -> handlers.GenerateOutput:
        params = handlers.generation_params(prompt, negative, "Euler", 2, 7, 3, 0, 0, batch, 1)
        return handlers.generate(session, label, params, progress=lambda done, total: calls.append((done, total)))

    plain = run("a red circle", batch=2)
    assert calls == [(1, 2), (2, 2)]  # per-step progress
    assert plain.seeds == [3, 4] and plain.captions == ["seed 3", "seed 4"] and plain.warnings == []
    assert len(plain.saved) == 2 and read_infotext(plain.saved[1]) == plain.infotexts[1]
    assert session.model(label) is session.model(label)  # loaded once
    tagged = run("a red circle <hypernet:toy-hypernet:1>", "toy-style")
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(tagged.images[0]))
    info = tagged.first_infotext
    assert info.startswith("a red circle <hypernet:toy-hypernet:1>\nNegative prompt: toy-style\n")
    assert "TI hashes" in info and tagged.warnings == []
    # As Forge's extension writes it (a1111-compat §3.8): the hypernetworks used, with A1111's 10-hex shorthash.
    digest = file_sha256(session.config.hypernetworks_dirs[0] / "toy-hypernet.pt")[:10]
    assert parse_infotext(info)[2]["Hypernet hashes"] == f"toy-hypernet: {digest}"
    problems = run("a <hypernet:broken-hypernet:1> <hypernet:missing:1> <lora:x:1> other-width <hypernet:toy-hypernet:1>")
    text = " | ".join(problems.warnings)
    assert "broken-hypernet.pt was skipped" in text and "unknown hypernet 'missing'" in text
    assert "embedding 'other-width' was skipped" in text
    # The tags the warnings call removed are not in the infotext either; the one used stays (issue 26 item 13).
    prompt, _, fields = parse_infotext(problems.first_infotext)
    assert prompt == "a    other-width <hypernet:toy-hypernet:1>"
    assert fields["Hypernet hashes"] == f"toy-hypernet: {digest}"
    assert "<li>" in problems.warnings_html and handlers.render_warnings([]) == ""


def test_generate_on_the_embedded_model_names_words_its_world_lacks(session: UiSession) -> None:
    params = handlers.generation_params("a circle on a white background", "", "Euler", 1, 7, 1, 0, 0, 1, 1)
    out = handlers.generate(session, DEFAULT_MODEL_LABEL, params)
    assert any("no white background" in w and "teal" in w for w in out.warnings), out.warnings


def test_warnings_do_not_show_the_servers_absolute_paths(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Inside a host the folders are absolute (its install path); a warning named the file by it (issue 26 item 17)."""
    hypernetworks = tmp_path / "webui" / "models" / "hypernetworks"
    hypernetworks.mkdir(parents=True)
    (hypernetworks / "broken.pt").write_text("junk")
    session = UiSession(UiConfig(ckpt=tiny_model_dir, hypernetworks_dirs=[hypernetworks], device="cpu"))
    params = handlers.generation_params("a <hypernet:broken:1>", "", "Euler", 1, 7, 1, 0, 0, 1, 1)
    warnings = handlers.generate(session, str(tiny_model_dir), params).warnings
    assert any("models/hypernetworks/broken.pt was skipped" in w for w in warnings), warnings
    assert not any(str(tmp_path) in w for w in warnings), warnings


def test_cpu_threads_set_per_job_standalone_and_left_alone_in_a_host(tmp_path: Path) -> None:
    """The standalone app sets torch's threads before each job; inside a host (whose adapter gives no cpu_threads)
    the host's choice stands (issue 26 item 2)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        UiSession(UiConfig(hash_cache=tmp_path / "h.json")).use_cpu_threads()  # as the host adapter builds it
        assert torch.get_num_threads() == 3
        standalone = UiSession(UiConfig(hash_cache=tmp_path / "h.json", cpu_threads="2"))
        standalone.use_cpu_threads()
        assert torch.get_num_threads() == 2
        # The page's CPU threads setting changes it from the next job on; a bad value is one line.
        assert standalone.set_cpu_threads("1") == "1"
        standalone.use_cpu_threads()
        assert torch.get_num_threads() == 1
        with pytest.raises(UiError, match="at least 1"):
            standalone.set_cpu_threads("0")
    finally:
        torch.set_num_threads(before)


def test_generate_reports_bad_sizes_without_generating(session: UiSession, tiny_model_dir: Path) -> None:
    params = handlers.generation_params("p", "", "Euler", 2, 7, 1, 40, 0, 1, 1)
    with pytest.raises(UiError, match="multiples of"):
        handlers.generate(session, str(tiny_model_dir), params)


# -- layout, scoping, standalone launch ------------------------------------------------------------------------


def test_every_element_id_is_ours(session: UiSession) -> None:
    from sdconcepts.ui.app import ROOT_ID, build_ui
    from sdconcepts.ui.compat import GRADIO_MAJOR

    blocks = build_ui(session)
    ids = [c.get("props", {}).get("elem_id") for c in blocks.config["components"]]
    ids = [i for i in ids if i]
    assert ROOT_ID in ids and "sdconcepts_prompt" in ids and "sdconcepts_neg_prompt" in ids
    assert len(ids) >= 30 and all(i.startswith("sdconcepts_") for i in ids), ids
    assert len(ids) == len(set(ids))
    if GRADIO_MAJOR >= 4:  # a search click for the final text waits for the running search instead of being ignored
        config = blocks.config
        by_id = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
        modes = {dep.get("trigger_mode") for dep in config["dependencies"]
                 for target in dep.get("targets", []) if by_id.get(target[0]) == "sdconcepts_ti_search_go"}
        assert modes == {"always_last"}, modes


def test_stylesheet_only_styles_our_root() -> None:
    css = re.sub(r"/\*.*?\*/", "", (ROOT / "style.css").read_text(), flags=re.S)
    selectors = [s.strip() for block in re.findall(r"([^{}]+)\{", css) for s in block.split(",")]
    assert selectors and all(s.startswith("#sdconcepts_root ") for s in selectors), selectors


def test_png_info_wraps_long_lines() -> None:
    css = re.sub(r"/\*.*?\*/", "", (ROOT / "style.css").read_text(), flags=re.S)
    rules = dict((sel.strip(), body) for sel, body in re.findall(r"([^{}]+)\{([^}]*)\}", css))
    body = rules["#sdconcepts_root .sdconcepts-png-info pre"]
    assert "white-space: pre-wrap" in body and "overflow-wrap: anywhere" in body


def test_javascript_defines_one_global_and_targets_our_ids() -> None:
    js = (ROOT / "javascript" / "sdconcepts.js").read_text()
    assert set(re.findall(r"window\.(\w+)", js)) == {"sdconcepts"}
    ids = set(re.findall(r'"(sdconcepts_\w+)"', js))
    assert ids == {"sdconcepts_prompt", "sdconcepts_neg_prompt", "sdconcepts_img2img_root",
                   "sdconcepts_img2img_prompt", "sdconcepts_img2img_neg_prompt"}
    assert js.lstrip().startswith("/*") and "(function () {" in js  # one IIFE: nothing leaks into the host's scope


def test_standalone_app_serves_on_localhost(session: UiSession) -> None:
    from sdconcepts.ui.app import launch_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    blocks = launch_app(session, port=port, block=False)
    try:
        assert blocks.server_name == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
    finally:
        blocks.close()


def test_launch_waits_for_a_page_slower_than_gradios_three_second_check() -> None:
    import http.server
    import threading

    from gradio import networking

    from sdconcepts.ui.compat import patient_localhost_check

    class SlowFirstAnswer(http.server.BaseHTTPRequestHandler):
        answered = 0

        def do_HEAD(self) -> None:  # noqa: N802 - the http.server method name
            SlowFirstAnswer.answered += 1
            if SlowFirstAnswer.answered == 1:
                time.sleep(4)  # a page that takes longer than gradio's 3 s timeout to render, once
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowFirstAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        # gradio's own check gives up on the first timeout: launch would refuse to start.
        assert networking.url_ok(url) is False
        SlowFirstAnswer.answered = 0
        with patient_localhost_check(seconds=30):
            assert networking.url_ok(url) is True
        assert SlowFirstAnswer.answered >= 2
    finally:
        server.shutdown()
        server.server_close()
    with patient_localhost_check(seconds=1):  # nothing listens there any more: still a refusal, after the wait
        started = time.monotonic()
        assert networking.url_ok(url) is False
        assert time.monotonic() - started >= 1


def test_command_line_without_a_command_configures_the_web_ui(tmp_path: Path) -> None:
    from sdconcepts.cli import main
    from sdconcepts.cli.main import build_parser

    args = build_parser().parse_args(["--port", "7999", "--listen", "--embeddings-dir", str(tmp_path)])
    assert (args.ui_port, args.ui_listen, args.ui_embeddings_dir) == (7999, True, [tmp_path])
    assert not hasattr(args, "func")  # no command: main() serves the web UI
    assert build_parser().parse_args([]).ui_listen is False
    with pytest.raises(SystemExit) as exit_info:
        main(["--hypernetworks-dir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2


def test_handler_errors_reach_the_page_as_gradio_errors() -> None:
    import gradio as gr

    from sdconcepts.ui.controls import guard as _guard

    def bad() -> None:
        raise UiError("steps must be between 1 and 150, got 0")

    with pytest.raises(gr.Error, match="steps must be between 1 and 150") as exc_info:
        _guard(bad)()
    if hasattr(exc_info.value, "print_exception"):  # gradio 4.42+: a user's mistake prints no console traceback
        assert exc_info.value.print_exception is False
    assert _guard(lambda: 3)() == 3


def test_idle_queue_sleeps_between_checks() -> None:
    """gradio 4+'s queue looked for work every 1 ms: an idle server used about 6 % of a core (0.5 % after, measured
    over 30 s with no page open; issue 26 item 10)."""
    import gradio as gr

    from sdconcepts.ui.compat import IDLE_QUEUE_SLEEP_S, calm_idle_queue

    with gr.Blocks() as blocks:
        gr.Textbox()
    blocks.queue()
    calm_idle_queue(blocks)
    queue = getattr(blocks, "_queue", None)
    if queue is None or not hasattr(queue, "sleep_when_free"):
        pytest.skip("this gradio's queue does not poll")
    assert queue.sleep_when_free >= IDLE_QUEUE_SLEEP_S
    assert queue.progress_update_sleep_when_free >= IDLE_QUEUE_SLEEP_S


def test_a_browser_that_went_away_leaves_no_traceback() -> None:
    import logging

    from starlette.requests import ClientDisconnect

    from sdconcepts.ui.compat import CLIENT_DISCONNECT_FILTER, quiet_client_disconnects

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", None,
                                 (type(error), error, error.__traceback__))

    try:
        try:
            raise ClientDisconnect()
        except ClientDisconnect as inner:
            raise RuntimeError("while reading the upload") from inner
    except RuntimeError as chained:
        wrapped = chained
    assert not CLIENT_DISCONNECT_FILTER.filter(record(ClientDisconnect()))
    assert not CLIENT_DISCONNECT_FILTER.filter(record(wrapped))
    assert CLIENT_DISCONNECT_FILTER.filter(record(ValueError("a real server error")))  # still logged
    quiet_client_disconnects()
    assert CLIENT_DISCONNECT_FILTER in logging.getLogger("uvicorn.error").filters


def test_every_search_answer_reaches_the_page_and_the_last_search_is_not_dropped() -> None:
    """A search whose request gradio dropped behind an in-flight one for the text already shown was never asked
    again: that answer equalled the shown HTML, so the page saw no change (issue 26 item 11)."""
    from sdconcepts.ui.cards import Card, render_cards
    from sdconcepts.ui.controls import card_outputs

    cards = [Card(kind="embedding", name="toy-style", prompt="toy-style", path=Path("toy-style.pt"), preview=None,
                  details=("2 vectors",), mtime=0.0, search_text="toy-style")]
    view = handlers.CardsView(render_cards(cards, query=""), "", "1 of 1 embeddings")
    first, second = card_outputs(view)[0], card_outputs(view)[0]
    assert first != second and _card_names(first) == _card_names(second)
    assert re.findall(r'data-answer="(\d+)"', first) != re.findall(r'data-answer="(\d+)"', second)
    # (the search button's trigger mode is checked on the built UI in test_every_element_id_is_ours)


# -- big libraries: pages, lazy reads; A1111 user metadata on cards ----------------------------------------------


def test_cards_come_in_pages_and_only_the_shown_page_is_read(tmp_path: Path) -> None:
    from sdconcepts.ui.cards import PAGE_SIZE

    for i in range(PAGE_SIZE + 5):
        save_embedding(Embedding(f"e{i:04d}", torch.zeros(1, WIDTH) + 0.1), tmp_path / f"g{i % 3}" / f"e{i:04d}.pt")
    session = UiSession(UiConfig(embeddings_dirs=[tmp_path]))
    session.read_in_background = lambda: None  # type: ignore[method-assign]  # keep the unread files unread
    first = handlers.embedding_cards_view(session)
    assert len(_card_names(first.cards_html)) == PAGE_SIZE and first.pages == 2
    assert "page 1 of 2" in first.summary and "not read yet" not in first.cards_html
    assert len(session.embeddings.files.pending()) == 5  # the second page's files
    second = handlers.embedding_cards_view(session, page=2, refresh=False)
    assert _card_names(second.cards_html) == [f"e{i:04d}" for i in range(PAGE_SIZE, PAGE_SIZE + 5)]
    assert session.embeddings.files.pending() == [] and "1 vector, width" in second.cards_html
    assert handlers.embedding_cards_view(session, page=99, refresh=False).page == 2  # clamped
    assert _card_names(handlers.embedding_cards_view(session, "e0007", refresh=False).cards_html) == ["e0007"]


def test_background_reader_reads_every_listed_file(tmp_path: Path) -> None:
    for i in range(30):
        save_embedding(Embedding(f"e{i}", torch.zeros(1, WIDTH) + 0.1), tmp_path / f"e{i}.safetensors")
    session = UiSession(UiConfig(embeddings_dirs=[tmp_path]))
    session.embeddings.refresh(lazy=True)
    assert len(session.embeddings.files.pending()) == 30
    session.read_in_background()
    assert session._reader is not None
    session._reader.join(timeout=60)
    assert session.embeddings.files.pending() == []
    assert all(r.hash for r in session.embeddings.records())


def test_cards_use_a1111_user_metadata(library: tuple[Path, Path]) -> None:
    import json

    embeddings, hypernetworks = library
    (hypernetworks / "anime-hypernet.json").write_text(json.dumps(
        {"description": "Anime <b>look</b>", "activation text": "cel shading", "preferred weight": 0.6,
         "negative text": "photo"}), encoding="utf-8")
    (hypernetworks / "toy-hypernet.json").write_text(json.dumps({"preferred weight": 0}), encoding="utf-8")
    (embeddings / "toy-style.json").write_text(json.dumps({"activation text": "toy world"}), encoding="utf-8")
    (embeddings / "styles" / "lineart.json").write_text("[oops", encoding="utf-8")
    session = UiSession(UiConfig(embeddings_dirs=[embeddings], hypernetworks_dirs=[hypernetworks],
                                 multiplier=lambda: 0.8))
    hn = handlers.hypernetwork_cards_view(session).cards_html
    anime = hn[hn.index('data-name="anime-hypernet"'):hn.index('data-name="toy-hypernet"')]
    # As A1111's Lora card: the preferred weight replaces the default multiplier and the activation text follows
    # the tag; the negative text goes to the negative prompt as (text:1). A weight of 0 keeps the default.
    assert 'data-prompt="&lt;hypernet:anime-hypernet:0.6&gt; cel shading"' in anime
    assert 'data-negative="(photo:1)"' in anime and "Anime &lt;b&gt;look&lt;/b&gt;" in anime
    assert 'data-prompt="&lt;hypernet:toy-hypernet:0.8&gt;"' in hn
    assert _card_names(handlers.hypernetwork_cards_view(session, "anime look", refresh=False).cards_html) == [
        "anime-hypernet"]  # the description is searched too
    ti = handlers.embedding_cards_view(session).cards_html
    assert 'data-prompt="toy-style toy world"' in ti
    assert "lineart.json: not valid JSON" in ti and 'data-name="lineart"' in ti  # reported, card still usable


def test_metadata_editor_round_trip_writes_only_beside_listed_files(library: tuple[Path, Path]) -> None:
    import json

    embeddings, hypernetworks = library
    session = UiSession(UiConfig(embeddings_dirs=[embeddings], hypernetworks_dirs=[hypernetworks]))
    handlers.hypernetwork_cards_view(session)
    target = str(hypernetworks / "toy-hypernet.pt")
    form = handlers.metadata_form(session, target)
    assert (form.description, form.preferred_weight, form.sd_version, form.status) == ("", 0.0, "Unknown", "")
    status = handlers.save_metadata(session, target, "Toys", "SD1", "toy", 0.7, "ugly", "my notes")
    assert status == "Saved toy-hypernet.json"
    assert json.loads((hypernetworks / "toy-hypernet.json").read_text(encoding="utf-8")) == {
        "description": "Toys", "sd version": "SD1", "activation text": "toy", "preferred weight": 0.7,
        "negative text": "ugly", "notes": "my notes"}
    again = handlers.metadata_form(session, target)
    assert (again.description, again.activation_text, again.preferred_weight, again.notes) == (
        "Toys", "toy", 0.7, "my notes")
    view = handlers.hypernetwork_cards_view(session)
    assert 'data-prompt="&lt;hypernet:toy-hypernet:0.7&gt; toy"' in view.cards_html
    with pytest.raises(UiError, match="not a listed"):
        handlers.save_metadata(session, str(hypernetworks / ".." / "elsewhere.pt"), "x", "SD1", "", 0, "", "")
    with pytest.raises(UiError, match="not a listed"):
        handlers.metadata_form(session, "/etc/passwd")
    with pytest.raises(UiError, match="Preferred weight"):
        handlers.save_metadata(session, target, "x", "SD1", "", "heavy", "", "")
    # A broken .json opens with the reason and is never overwritten.
    (embeddings / "toy-style.json").write_text("{broken", encoding="utf-8")
    handlers.embedding_cards_view(session)
    broken = handlers.metadata_form(session, str(embeddings / "toy-style.pt"))
    assert "not valid JSON" in broken.status
    with pytest.raises(UiError, match="not valid JSON"):
        handlers.save_metadata(session, str(embeddings / "toy-style.pt"), "x", "SD1", "", 0, "", "")
    assert (embeddings / "toy-style.json").read_text(encoding="utf-8") == "{broken"
