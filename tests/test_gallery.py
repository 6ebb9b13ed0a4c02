"""The gallery: heat-map maths, attention on the named objects, and the page in a real browser."""

import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from captioning import gallery, heatmaps
from captioning.decode import word_attention
from captioning.shapes import OBJECT_RE


@pytest.mark.parametrize("grid, size", [((2, 3), (6, 4)), ((3, 3), (7, 5)), ((8, 8), (64, 64))])
def test_a_one_hot_attention_lights_exactly_its_grid_cell(grid, size):
    h, w = grid
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    for cell in range(h * w):
        heat = heatmaps.upsample(np.eye(h * w)[cell], grid, size)
        assert heat.shape == (height, width)
        r, c = divmod(cell, w)
        inside = (ys * h // height == r) & (xs * w // width == c)  # the pixels whose cell is (r, c)
        assert inside.any() and (heat[inside] == 1).all() and (heat[~inside] == 0).all()


def test_overlay_colours_only_where_the_decoder_looked():
    image = np.full((4, 4, 3), 200, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[:2, :2] = 0.3  # scaled to its maximum: this block is fully lit
    out = heatmaps.overlay(image, heat).astype(int)
    assert (out[2:, 2:] == int(200 * 0.45)).all()  # elsewhere: dimmed photo only
    lit = out[0, 0]
    assert lit[0] > lit[1] and lit[0] > out[3, 3, 0]  # painted towards red, brighter than the rest


def test_attention_on_objects_against_a_hand_made_scene():
    grid = (2, 2)  # cells: (0,0) (0,1) / (1,0) (1,1); the circle fills the left column
    truth = {"objects": [{"size": "small", "colour": "red", "shape": "circle", "box": [0.0, 0.0, 0.5, 1.0]}]}
    words = ["a", "small", "red", "circle"]
    alphas = np.array([[0.25] * 4, [1, 0, 0, 0], [0.5, 0, 0.5, 0], [0, 1, 0, 0]], np.float32)
    share, uniform, n = heatmaps.attention_on_objects([(words, alphas)], [truth], grid, OBJECT_RE)
    assert n == 3  # "small", "red", "circle": the object's words, not "a"
    assert share == pytest.approx((1 + 1 + 0) / 3) and uniform == pytest.approx(0.5)
    # a caption naming the wrong object is left out
    assert heatmaps.attention_on_objects([(["a", "small", "red", "square"], alphas)], [truth], grid, OBJECT_RE)[2] == 0


def test_word_maps_are_the_attention_each_word_was_generated_with():
    from captioning.beam import beam_search
    from captioning.decode import make_step_fn
    from captioning.decoders import build_decoder
    from captioning.vocab import SPECIALS, Vocabulary

    tf.keras.utils.set_random_seed(0)
    decoder = build_decoder(
        "gru",
        vocab_size=9,
        feature_dim=6,
        num_locations=4,
        embed_dim=5,
        units=7,
        attention=True,
        attention_units=3,
        dropout=0.0,
    )
    vocab = Vocabulary(list(SPECIALS) + list("abcde"))
    feats = np.random.default_rng(1).normal(size=(2, 4, 6)).astype("float32")
    seqs, _, _ = beam_search(
        make_step_fn(decoder),
        tuple(np.asarray(s) for s in decoder.initial_state(feats)),
        2,
        1,
        6,
        vocab.start_id,
        vocab.end_id,
    )
    captions = [vocab.decode(s) for s in seqs]
    maps = word_attention(decoder, vocab, feats, captions)
    for b, (words, alphas) in enumerate(maps):  # replay greedy decoding step by step
        assert words == captions[b].split() and alphas.shape == (len(words), 4)
        state = tuple(s[b : b + 1] for s in decoder.initial_state(feats))
        token = vocab.start_id
        for t, word in enumerate(words):
            _, state, alpha = decoder.step(tf.constant([token]), state)
            np.testing.assert_allclose(alphas[t], alpha.numpy()[0], atol=1e-5)
            token = vocab.index[word]


def test_pick_groups_best_worst_and_a_seeded_sample():
    preds = [{"image": f"i{k}", "CIDEr": float(k)} for k in range(10)]
    groups = gallery.pick(preds, 3, seed=5)
    assert [p["image"] for p in groups["Best (highest CIDEr)"]] == ["i9", "i8", "i7"]
    assert [p["image"] for p in groups["Worst (lowest CIDEr)"]] == ["i0", "i1", "i2"]
    assert groups["Random sample"] == gallery.pick(preds, 3, seed=5)["Random sample"]
    assert len(groups["Random sample"]) == 3


# ---- the page, in a real browser -----------------------------------------------------------

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium: `apt-get install chromium` (.ci/run installs it); the page is not checked")
    return path


def test_gallery_renders_in_headless_chromium(tiny_run, tmp_path):
    import json

    from playwright.sync_api import sync_playwright

    root, outs = tiny_run
    index = root / "reports/gallery/index.html"
    html = index.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing remote
    from conftest import TINY_PARAMS

    per_group, n_test = TINY_PARAMS["report"]["per_group"], 4  # the tiny run shows its 4 test images
    assert per_group >= n_test  # so best, worst and the sample each show all of them
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        panels = page.locator(".panel").count()
        maps = page.locator(".maps figure").count()
        curves = page.locator(".curves svg").count()
        page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)
        browser.close()
    assert errors == []
    assert images and all(complete and width > 0 for _, complete, width in images), images
    assert panels == 3 * n_test and curves == 1
    words = sum(len(e["caption"].split()) for e in json.loads((root / "reports/predictions.json").read_text()))
    assert maps == 3 * words  # one map per generated word, in every panel
    assert len(images) == 3 * n_test + maps  # the photos and the maps, all loaded
    assert (tmp_path / "gallery.png").stat().st_size > 10_000
    summary = json.loads((root / "reports/attention.json").read_text())
    assert summary["panels"] == n_test and summary["attention"] is True and summary["object_words"] >= 0
    if summary["object_words"]:  # the tiny model may name no object right
        assert 0 <= summary["attention_in_object"] <= 1 and 0 < summary["uniform_in_object"] < 1
    assert outs["report"].strip().splitlines()[-1].startswith("report: 4 panels")


def test_caption_cli_writes_attention_panels_and_a_page(tiny_run, tmp_path):
    from click.testing import CliRunner

    from captioning.commands import main as cli

    root, _ = tiny_run
    imgs = sorted((root / "data/shapes/images").glob("*.png"))[:2]
    result = CliRunner().invoke(
        cli,
        [
            "caption",
            "--model",
            str(root / "models_final"),
            "--attention",
            str(tmp_path / "att"),
            "--html",
            str(tmp_path / "page.html"),
            *map(str, imgs),
        ],
    )
    assert result.exit_code == 0, result.output
    caps = [line.split("\t")[1] for line in result.stdout.splitlines()]
    for i, (img, cap) in enumerate(zip(imgs, caps)):
        stem = f"{i:03d}_{img.stem}"
        assert (tmp_path / "att" / f"{stem}.png").is_file()
        assert len(list((tmp_path / "att").glob(f"{stem}_*.png"))) == len(cap.split())
    page = (tmp_path / "page.html").read_text()
    assert all(cap in page for cap in caps) and (tmp_path / "page_files").is_dir()
    if shutil.which("chromium"):  # the page's images load from beside it
        out = subprocess.run(
            [shutil.which("chromium"), "--headless", *CHROMIUM_ARGS, "--dump-dom", (tmp_path / "page.html").as_uri()],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert caps[0] in out.stdout


def test_a_panel_lists_the_other_captions_when_evaluate_kept_several():
    panel = {"image": "a.png", "png": "a.png", "caption": "a red circle", "references": ["a red circle"]}
    plain = gallery.page("t", {}, {"Best": [panel]}, "")
    assert "class='nbest'" not in plain
    html = gallery.page("t", {}, {"Best": [{**panel, "captions": ["a red circle", "a red disc", "red & round"]}]}, "")
    assert "<ol class='nbest' start='2'><li>a red disc</li><li>red &amp; round</li></ol>" in html
