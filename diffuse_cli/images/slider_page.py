"""The time slider as one self-contained HTML page: every image, script and style inline, no network.

Each row of frames (forward, walk back, x̂_0, restored) is one PNG sprite: the frames side by side.
The page draws the slider's frame onto canvases at the model's own resolution and lets CSS enlarge
them with crisp pixels, so that what a canvas holds is exactly what the engine computed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

import torch

from .pictures import to_pil
from ..diffusion.slider import Frames

ROWS = (("forward", "forward: the image at t, q(x_t | x_0)"),
        ("walk", "walk back: the model's x_t from the static at T"),
        ("walk_x0", "what the model believes is under the noise (x̂_0)"),
        ("restored", "restore from t: the image noised to t, denoised by the model"))


def sprite(images: torch.Tensor) -> str:
    """uint8 (K, C, H, W) frames side by side, as a PNG data URI."""
    strip = torch.cat(list(images), dim=-1)  # (C, H, K*W)
    buf = io.BytesIO()
    to_pil(strip).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def alpha_bar_plot(ks: list[int], alpha_bar: list[float], width: int = 360, height: int = 120) -> str:
    """An inline SVG of ᾱ_t against t, with a marker the page moves to the slider's t."""
    T = max(ks)
    points = " ".join(f"{8 + k / T * (width - 16):.1f},{height - 18 - a * (height - 30):.1f}"
                      for k, a in zip(ks, alpha_bar))
    return (f'<svg id="plot" width="{width}" height="{height}" role="img" aria-label="alpha-bar against t">'
            f'<rect x="8" y="12" width="{width - 16}" height="{height - 30}" fill="none" stroke="#999"/>'
            f'<polyline points="{points}" fill="none" stroke="#1946a0" stroke-width="2"/>'
            f'<circle id="marker" r="5" fill="#d2691e" cx="8" cy="12"/>'
            f'<text x="8" y="{height - 3}" font-size="11">t = 0</text>'
            f'<text x="{width - 8}" y="{height - 3}" font-size="11" text-anchor="end">t = {T}</text>'
            f'<text x="12" y="24" font-size="11">ᾱ_t</text></svg>')


def page(frames: Frames, title: str) -> str:
    """The whole page, as text."""
    k, c, h, w = frames.forward.shape
    scale = max(2, 192 // max(h, w))  # 16-64 px models shown large, crisply
    data = {"ks": frames.ks, "alphaBar": frames.alpha_bar, "width": w, "height": h,
            "snr": [a / (1 - a) if a < 1 else math.inf for a in frames.alpha_bar]}
    data["snr"] = [None if math.isinf(s) else s for s in data["snr"]]
    images = {name: sprite(getattr(frames, name)) for name, _ in ROWS}
    panels = "".join(f'<figure><canvas id="{name}" width="{w}" height="{h}" style="width:{w * scale}px;'
                     f'height:{h * scale}px"></canvas><figcaption>{html.escape(caption)}</figcaption></figure>'
                     for name, caption in ROWS)
    asked = f" into a {html.escape(frames.class_name)}" if frames.class_name else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>
body {{ font: 15px system-ui, sans-serif; margin: 24px; color: #222; }}
canvas {{ image-rendering: pixelated; image-rendering: crisp-edges; border: 1px solid #ccc; background: #eee; }}
figure {{ display: inline-block; margin: 0 16px 16px 0; vertical-align: top; }}
figcaption {{ max-width: {max(w * scale, 160)}px; font-size: 13px; }}
#controls {{ display: flex; align-items: center; gap: 16px; margin: 12px 0 20px; flex-wrap: wrap; }}
#t {{ width: min(640px, 90vw); }}
output {{ font-variant-numeric: tabular-nums; min-width: 22em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Drag right and the image dissolves into static; drag left and the model walks back out of it{asked}.
Arrow keys move the slider; the button sweeps it.</p>
<div id="controls"><button id="play" type="button">play</button>
<input id="t" type="range" min="0" max="{k - 1}" value="0" step="1" aria-label="diffusion step t">
<output id="readout" for="t"></output></div>
{alpha_bar_plot(frames.ks, frames.alpha_bar)}
<div>{panels}</div>
<script>
const DATA = {json.dumps(data)};
const SPRITES = {json.dumps(images)};
const slider = document.getElementById("t"), readout = document.getElementById("readout");
const sheets = {{}};
let loaded = 0;
for (const [name, uri] of Object.entries(SPRITES)) {{
  const img = new Image();
  img.onload = () => {{ loaded += 1; if (loaded === Object.keys(SPRITES).length) show(); }};
  img.src = uri;
  sheets[name] = img;
}}
function show() {{
  const i = Number(slider.value), W = DATA.width, H = DATA.height;
  for (const name of Object.keys(sheets)) {{
    const ctx = document.getElementById(name).getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, W, H);
    ctx.drawImage(sheets[name], i * W, 0, W, H, 0, 0, W, H);
  }}
  const a = DATA.alphaBar[i], snr = DATA.snr[i], t = DATA.ks[i], T = DATA.ks[DATA.ks.length - 1];
  readout.textContent = `t = ${{t}}   ᾱ_t = ${{a.toFixed(4)}}   SNR = ${{snr === null ? "∞" : snr.toPrecision(3)}}`;
  const plot = document.getElementById("plot"), marker = document.getElementById("marker");
  const pw = Number(plot.getAttribute("width")), ph = Number(plot.getAttribute("height"));
  marker.setAttribute("cx", 8 + t / T * (pw - 16));
  marker.setAttribute("cy", ph - 18 - a * (ph - 30));
  document.body.dataset.shown = String(i);
}}
slider.addEventListener("input", show);
let timer = null, direction = 1;
document.getElementById("play").addEventListener("click", (event) => {{
  if (timer) {{ clearInterval(timer); timer = null; event.target.textContent = "play"; return; }}
  event.target.textContent = "pause";
  timer = setInterval(() => {{
    let i = Number(slider.value) + direction;
    if (i >= Number(slider.max) || i <= 0) direction = -direction;
    slider.value = String(Math.min(Math.max(i, 0), Number(slider.max)));
    show();
  }}, 80);
}});
slider.focus();
</script></body></html>
"""
