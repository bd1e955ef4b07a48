"""A browser demo: one photo, your classes, the unary and the refined labels side by side.

    pip install -e ".[demo]"
    maskclip-demo model=tiny_vit          # offline, random weights (meaningless labels, the real pipeline)
    maskclip-demo model=vit_b16 port=7861 # OpenAI's ViT-B/16 (open_clip downloads it once)

Arguments are `key=value`: `model=` any model preset (conf/model/), `host=` / `port=` where to
serve (default 127.0.0.1:7860), and any other config override of the refine command
(`model.pretrained=/path/file.bin`, `device=cuda`, ...). The page takes a bundled photo or an
upload, the classes (one per line or separated by ";", synonyms separated by commas), the
dense mode, the protocol, the refiner preset and APro's ζ_g / ζ_s, and shows image | unary |
refined with a legend and the seconds per stage; the label PNG and the probabilities
(safetensors, float16) download.

The weights load once per process: generators for other protocols, dense modes or vocabularies
are built on copies of the loaded weights; text embeddings come from the package's on-disk
cache and built generators are kept in memory (the most recent few). Bad input (no image, an
empty or duplicate class, a preset the protocol cannot run) is a message in the page.
"""

from __future__ import annotations

import atexit
import copy
import html
import shutil
import sys
import tempfile
import threading
import traceback
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

DENSE_MODES = ("maskclip", "sclip", "clearclip", "naclip", "proxyclip", "vanilla")
KEPT_GENERATORS = 4  # built generators (protocol, dense mode, vocabulary) kept in memory
KEPT_REQUESTS = 32  # requests whose download files stay in the demo's temporary folder
DEFAULT_CLASSES = "background\ncat, kitten\nperson\ngrass, lawn\nsky"
SERVER = {"host": "127.0.0.1", "port": 7860}


def _conf_names(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml)."""
    folder = resources.files("maskclip_apro.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_classes(text: str) -> list[str]:
    """Vocabulary lines from the page's text box: one class per line or separated by ';'."""
    from .data import load_vocab

    lines = [part.strip() for line in str(text or "").splitlines() for part in line.split(";")]
    return load_vocab([line for line in lines if line])


class DemoModel:
    """The loaded weights and the generators built on them; predictions for the page (thread-safe)."""

    def __init__(self, model: str = "vit_b16", overrides: Sequence[str] = ()) -> None:
        self.model = model
        self.overrides = list(overrides)
        self._weights: dict[tuple, tuple[Any, str]] = {}
        self._generators: "OrderedDict[tuple, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self.out_dir = Path(tempfile.mkdtemp(prefix="maskclip-demo-"))  # downloads; removed at exit
        atexit.register(shutil.rmtree, self.out_dir, True)
        self.weight_loads = 0  # how many times weights were read (once per process)
        self._requests = 0

    def config(self, protocol: str, dense: str, preset: str, zeta_g: Optional[float] = None,
               zeta_s: Optional[float] = None):
        """The refine command's config for these choices (the demo's own overrides last win)."""
        from .config import compose

        overrides = [f"model={self.model}", f"protocol={protocol}", f"refine={preset}", f"model.dense={dense}"]
        if zeta_g is not None:
            overrides.append(f"refine.apro.zeta_g={float(zeta_g)}")
        if zeta_s is not None:
            overrides.append(f"refine.apro.zeta_s={float(zeta_s)}")
        return compose("refine", overrides + self.overrides)

    def _load_clip(self, model: str, pretrained: Optional[str], device: Any = "cpu") -> tuple[Any, str]:
        """The CLIP weights, read from disk on the first call only; a copy each time (a protocol may
        reconfigure the image tower)."""
        from .generator.models import load_clip

        key = (model, pretrained, str(device))
        if key not in self._weights:
            self._weights[key] = load_clip(model, pretrained, device)
            self.weight_loads += 1
        clip, identity = self._weights[key]
        return copy.deepcopy(clip), identity

    def segmenter(self, classes: Sequence[str], protocol: str, dense: str, preset: str,
                  zeta_g: Optional[float] = None, zeta_s: Optional[float] = None):
        """A Segmenter for the choices: a kept generator for (protocol, dense, classes), a fresh refiner chain."""
        from .config import build_generator_from_config, refine_params, refine_steps
        from .refiners import Chain
        from .schema import check_config
        from .segmenter import Segmenter

        cfg = self.config(protocol, dense, preset, zeta_g, zeta_s)
        check_config(cfg, "refine")
        chain = Chain.from_steps(refine_steps(cfg), refine_params(cfg))
        key = (protocol, dense, tuple(classes))
        with self._lock:
            generator = self._generators.get(key)
            if generator is None:
                generator = build_generator_from_config(cfg, classes, load_clip=self._load_clip)
                self._generators[key] = generator
                while len(self._generators) > KEPT_GENERATORS:
                    self._generators.popitem(last=False)
            self._generators.move_to_end(key)
        return Segmenter(generator, chain)

    def _request_folder(self) -> Path:
        """A new folder for one request's downloads; folders of all but the last KEPT_REQUESTS are removed
        (Gradio has copied their files into its own cache by then)."""
        with self._lock:
            self._requests += 1
            folder = self.out_dir / f"{self._requests:08d}"
            folder.mkdir()
            for old in sorted(self.out_dir.iterdir())[:-KEPT_REQUESTS]:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def run(self, image: np.ndarray, classes_text: str, dense: str, protocol: str, preset: str,
            zeta_g: float, zeta_s: float) -> dict[str, Any]:
        """Unary and refined predictions of one image: panel, legend, times and the two files."""
        from .palette import voc_palette
        from .refiners import Chain
        from .visualize import legend_entries, make_panel
        from .writing import save_label_png, save_safetensors

        if image is None:
            raise ValueError("no image: pick a bundled photo or upload one")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"the image must be RGB (H, W, 3) uint8, got {image.dtype} {image.shape}")
        classes = parse_classes(classes_text)
        seg = self.segmenter(classes, protocol, dense, preset, zeta_g, zeta_s)
        preds = seg.predict_many(image, {"unary": Chain([]), "refined": seg.refiner})
        unary, refined = preds["unary"], preds["refined"]
        palette = voc_palette(256)
        title = preset if seg.refiner.refiners else f"{preset} (no refiner)"
        panel = make_panel([("image", image), (f"unary ({seg.generator.name})", unary.labels),
                            (f"refined ({title})", refined.labels)], class_names=seg.class_names, palette=palette)
        folder = self._request_folder()
        label_path, probs_path = folder / "labels.png", folder / "probabilities.safetensors"
        save_label_png(label_path, refined.labels, palette)
        save_safetensors(probs_path, {"probs": refined.probs.float().half()},
                         metadata={"classes": "\n".join(seg.class_names)})
        return {
            "panel": panel,
            "legend": legend_entries([unary.labels, refined.labels], seg.class_names, palette),
            "times": refined.times,
            "labels": refined.labels,
            "label_path": str(label_path),
            "probs_path": str(probs_path),
        }


def first_line(error: BaseException) -> str:
    """An exception as one line for the page (Hydra's override errors span several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def legend_html(entries: Sequence[tuple[str, tuple[int, int, int]]]) -> str:
    """The legend as HTML: a swatch and a name per class shown."""
    items = "".join(
        f'<span style="margin-right:14px;white-space:nowrap"><span style="display:inline-block;width:12px;'
        f'height:12px;border:1px solid #000;vertical-align:middle;background:rgb{tuple(colour)}"></span> '
        f"{html.escape(name)}</span>" for name, colour in entries)
    return f'<div class="maskclip-legend"><b>Legend:</b> {items}</div>'


def times_markdown(times: dict[str, float]) -> str:
    """Seconds per stage, one line."""
    stages = ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds in times.items())
    return f"**Seconds per stage:** {stages} (total {sum(times.values()):.3f} s)"


def build_app(demo: DemoModel):
    """The Gradio Blocks page around `demo`; its segment function is also the API endpoint /segment."""
    import gradio as gr

    from .samples import sample_paths

    protocols, presets = _conf_names("protocol"), _conf_names("refine")
    apro = demo.config("maskclip", "maskclip", "apro").refine.apro

    def segment(image, classes, dense, protocol, preset, zeta_g, zeta_s):
        try:
            result = demo.run(image, classes, dense, protocol, preset, zeta_g, zeta_s)
        except Exception as error:  # the page shows one line; anything but bad input also goes to the log
            if not isinstance(error, (ValueError, FileNotFoundError)):
                traceback.print_exc()
            raise gr.Error(first_line(error)) from None
        return (result["panel"], legend_html(result["legend"]), times_markdown(result["times"]),
                result["label_path"], result["probs_path"])

    with gr.Blocks(title="maskclip_apro demo", analytics_enabled=False) as app:  # offline: no telemetry
        gr.Markdown(f"# maskclip_apro: CLIP labels refined by APro\nModel: `{demo.model}`. Pick a photo or "
                    "upload one, type classes (one per line, synonyms separated by commas), then Segment.")
        with gr.Row():
            with gr.Column(scale=1):
                photos = [str(p) for p in sample_paths()]
                image = gr.Image(photos[1], type="numpy", label="image", sources=["upload", "clipboard"])
                gr.Examples([[p] for p in photos], inputs=[image], label="bundled photos")
                classes = gr.Textbox(DEFAULT_CLASSES, lines=5, label="classes (one per line; synonyms with commas)")
                dense = gr.Dropdown(list(DENSE_MODES), value="maskclip", label="dense mode (model.dense)")
                protocol = gr.Dropdown(protocols, value="maskclip", label="protocol")
                preset = gr.Dropdown(presets, value="apro", label="refiner preset (refine=)")
                zeta_g = gr.Slider(0.01, 1.0, value=float(apro.zeta_g), step=0.01, label="APro ζ_g (GP)")
                zeta_s = gr.Slider(0.05, 2.0, value=float(apro.zeta_s), step=0.05, label="APro ζ_s (LP)")
                button = gr.Button("Segment", variant="primary")
            with gr.Column(scale=2):
                panel = gr.Image(label="image | unary | refined", format="png", interactive=False)
                legend = gr.HTML(legend_html([]))
                times = gr.Markdown("")
                label_file = gr.File(label="label PNG (palette)")
                probs_file = gr.File(label="probabilities (safetensors, float16)")
        inputs, outputs = [image, classes, dense, protocol, preset, zeta_g, zeta_s], [panel, legend, times, label_file, probs_file]
        button.click(segment, inputs, outputs, api_name="segment")
        app.load(segment, inputs, outputs, api_visibility="private")  # the page opens on a result
    return app


def parse_args(argv: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(model, server settings, config overrides) from `key=value` arguments."""
    model, server, overrides = "vit_b16", dict(SERVER), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {arg!r} is not key=value (e.g. model=tiny_vit, port=7861)")
        if key == "model":
            model = value
        elif key in server:
            server[key] = int(value) if key == "port" and value.isdigit() else value
            if key == "port" and not isinstance(server[key], int):
                raise ValueError(f"port must be an integer, got {value!r}")
        else:
            overrides.append(arg)
    return model, server, overrides


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The maskclip-demo command."""
    try:
        model, server, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        if model not in _conf_names("model"):
            raise ValueError(f"model={model} is not a model preset; choose one of {_conf_names('model')}")
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ValueError('the demo needs Gradio: pip install -e ".[demo]"') from None
        demo = DemoModel(model, overrides)
        try:  # a bad override fails here, before the server starts
            demo.config("maskclip", "maskclip", "apro")
        except Exception as error:  # Hydra's composition errors
            raise ValueError(f"{' '.join(overrides)}: {first_line(error)}") from None
        app = build_app(demo)
        print(f"maskclip-demo: model={model}; open http://{server['host']}:{server['port']} (Ctrl-C stops it)")
        app.launch(server_name=server["host"], server_port=server["port"], allowed_paths=[str(demo.out_dir)])
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("\nmaskclip-demo stopped (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
