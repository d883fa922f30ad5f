"""An interactive, offline 3D view of a mesh for the run report: a small WebGL viewer.

`viewer_html` returns a ``<canvas>`` and an inline ``<script>``: the mesh's triangles (positions,
flat normals and vertex colours, unshared: three vertices per face) are embedded as base64
float32 / uint8 arrays, so the page needs no network and no file beside it. Drag rotates the
object about its centre, the wheel zooms, a double click resets the view. Shading is the vertex
colour times a headlight term ``0.35 + 0.65 |n . v|`` (two-sided: a mesh's orientation is not
trusted). After its first frame the script writes into the canvas's ``data-drawn`` attribute how
many of its pixels differ from the clear colour (a check for headless browsers); without WebGL
it shows a note instead and raises nothing.
"""

from __future__ import annotations

import base64
import html

import numpy as np

# Meshes with more faces than this are not embedded (a page of tens of megabytes helps nobody);
# the report says so and points to the mesh files.
MAX_FACES = 400_000
CANVAS_SIDE = 512

_SCRIPT = r"""
(function () {
  var canvas = document.getElementById("mesh-view");
  function b64(text, Kind) {
    var raw = atob(text), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { bytes[i] = raw.charCodeAt(i); }
    return new Kind(bytes.buffer);
  }
  function note(text) {
    var p = document.createElement("p");
    p.className = "note";
    p.textContent = text;
    canvas.replaceWith(p);
  }
  var gl = canvas.getContext("webgl", { preserveDrawingBuffer: true, antialias: true });
  if (!gl) { note("This browser has no WebGL: the mesh cannot be shown here."); return; }
  var data = canvas.dataset;
  var position = b64(data.position, Float32Array);
  var normal = b64(data.normal, Float32Array);
  var color = b64(data.color, Uint8Array);
  var count = position.length / 3;
  var lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
  for (var v = 0; v < count; v++) {
    for (var k = 0; k < 3; k++) {
      lo[k] = Math.min(lo[k], position[3 * v + k]);
      hi[k] = Math.max(hi[k], position[3 * v + k]);
    }
  }
  var centre = [0, 1, 2].map(function (k) { return 0.5 * (lo[k] + hi[k]); });
  var radius = 0.5 * Math.hypot(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) || 1;
  var vs = "attribute vec3 p; attribute vec3 n; attribute vec3 c; uniform mat4 m;" +
    "uniform mat3 r; varying vec3 col; void main() { vec3 q = r * n;" +
    "col = c * (0.35 + 0.65 * abs(q.z)); gl_Position = m * vec4(p, 1.0); }";
  var fs = "precision mediump float; varying vec3 col;" +
    "void main() { gl_FragColor = vec4(col, 1.0); }";
  function shader(kind, source) {
    var s = gl.createShader(kind);
    gl.shaderSource(s, source);
    gl.compileShader(s);
    return s;
  }
  var program = gl.createProgram();
  gl.attachShader(program, shader(gl.VERTEX_SHADER, vs));
  gl.attachShader(program, shader(gl.FRAGMENT_SHADER, fs));
  gl.linkProgram(program);
  if (!gl.getProgramParameter(program, gl.LINK_STATUS)) {
    note("The mesh viewer's shaders did not compile in this browser."); return;
  }
  gl.useProgram(program);
  function attribute(name, array, size, type, normalized) {
    var buffer = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
    gl.bufferData(gl.ARRAY_BUFFER, array, gl.STATIC_DRAW);
    var at = gl.getAttribLocation(program, name);
    gl.enableVertexAttribArray(at);
    gl.vertexAttribPointer(at, size, type, normalized, 0, 0);
  }
  attribute("p", position, 3, gl.FLOAT, false);
  attribute("n", normal, 3, gl.FLOAT, false);
  attribute("c", color, 3, gl.UNSIGNED_BYTE, true);
  var uM = gl.getUniformLocation(program, "m"), uR = gl.getUniformLocation(program, "r");
  var yaw = -0.6, pitch = 0.35, zoom = 1.0;
  function draw() {
    var cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    // Rotation: yaw about world y, then pitch about the camera's x (column-major below).
    var R = [cy, sp * sy, -cp * sy, 0, cp, sp, sy, -sp * cy, cp * cy];
    var s = zoom / radius, d = 3.0;
    var f = 1 / Math.tan(0.5 * 0.6), near = 0.1, far = 10.0;
    var a = (far + near) / (near - far), b = 2 * far * near / (near - far);
    var t = [0, 1, 2].map(function (k) {
      return -(R[k] * centre[0] + R[3 + k] * centre[1] + R[6 + k] * centre[2]) * s;
    });
    // model-view: scale s, rotate R, translate (t - (0, 0, d)); then the perspective f, a, b.
    var M = [
      f * s * R[0], f * s * R[1], a * s * R[2], -s * R[2],
      f * s * R[3], f * s * R[4], a * s * R[5], -s * R[5],
      f * s * R[6], f * s * R[7], a * s * R[8], -s * R[8],
      f * t[0], f * t[1], a * (t[2] - d) + b, -(t[2] - d)
    ];
    gl.viewport(0, 0, canvas.width, canvas.height);
    gl.clearColor(1, 1, 1, 1);
    gl.enable(gl.DEPTH_TEST);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    gl.uniformMatrix4fv(uM, false, new Float32Array(M));
    gl.uniformMatrix3fv(uR, false, new Float32Array(R));
    gl.drawArrays(gl.TRIANGLES, 0, count);
  }
  draw();
  var pixels = new Uint8Array(4 * canvas.width * canvas.height), drawn = 0;
  gl.readPixels(0, 0, canvas.width, canvas.height, gl.RGBA, gl.UNSIGNED_BYTE, pixels);
  for (var i = 0; i < pixels.length; i += 4) {
    if (pixels[i] < 250 || pixels[i + 1] < 250 || pixels[i + 2] < 250) { drawn++; }
  }
  canvas.setAttribute("data-drawn", String(drawn));
  var last = null;
  canvas.addEventListener("pointerdown", function (e) {
    last = [e.clientX, e.clientY];
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointerup", function () { last = null; });
  canvas.addEventListener("pointermove", function (e) {
    if (!last) { return; }
    yaw += 0.01 * (e.clientX - last[0]);
    pitch = Math.max(-1.55, Math.min(1.55, pitch + 0.01 * (e.clientY - last[1])));
    last = [e.clientX, e.clientY];
    requestAnimationFrame(draw);
  });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoom = Math.max(0.2, Math.min(8, zoom * Math.exp(-0.001 * e.deltaY)));
    requestAnimationFrame(draw);
  }, { passive: false });
  canvas.addEventListener("dblclick", function () {
    yaw = -0.6; pitch = 0.35; zoom = 1.0; requestAnimationFrame(draw);
  });
})();
"""


def triangle_arrays(vertices, faces, colors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unshared triangles: positions ``[3F, 3]`` float32, flat unit normals ``[3F, 3]``
    float32 and RGB ``[3F, 3]`` uint8, from ``vertices [V, 3]``, ``faces [F, 3]`` and vertex
    colours ``colors [V, 3|4]`` uint8."""
    vertices = np.asarray(vertices, np.float32)
    faces = np.asarray(faces, np.int64)
    corners = vertices[faces]  # [F, 3, 3]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    normals = np.repeat(normal[:, None], 3, axis=1)
    rgb = np.asarray(colors, np.uint8)[:, :3][faces]
    return corners.reshape(-1, 3), normals.reshape(-1, 3).astype(np.float32), rgb.reshape(-1, 3)


def viewer_html(vertices, faces, colors, *, side: int = CANVAS_SIDE) -> str:
    """The viewer's HTML (a canvas and its script) for a non-empty mesh (see the module)."""
    positions, normals, rgb = triangle_arrays(vertices, faces, colors)

    def encode(array: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")

    return (
        f'<canvas id="mesh-view" width="{int(side)}" height="{int(side)}" '
        f'data-position="{encode(positions)}" data-normal="{encode(normals)}" '
        f'data-color="{encode(rgb)}" title="{html.escape("drag: rotate, wheel: zoom")}">'
        f"</canvas>\n<script>{_SCRIPT}</script>"
    )


__all__ = ["CANVAS_SIDE", "MAX_FACES", "triangle_arrays", "viewer_html"]
