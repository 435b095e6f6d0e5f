// The interactive attention report (lightning_attn.html_report): draws what the page's JSON holds, nothing fetched.
// window.lightningAttn exposes the view and the numbers of what is drawn, for the tests and for users' scripts.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("la-data").textContent);
  const $ = (id) => document.getElementById(id);
  const meta = D.meta;
  const [GH, GW] = meta.grid_size;
  const NP = GH * GW; // patches
  const PREFIX = meta.num_prefix_tokens || 0;
  const LUT = D.colour.lut;
  const ALPHA = D.colour.alpha;
  const RANGE = D.colour.range;

  // ------------------------------------------------------------------ arrays (float16 / uint8 in base64)
  const HALF = new Float32Array(65536);
  for (let bits = 0; bits < 65536; bits++) {
    const sign = bits & 0x8000 ? -1 : 1;
    const e = (bits >> 10) & 0x1f;
    const f = bits & 0x3ff;
    HALF[bits] = e === 0 ? sign * f * Math.pow(2, -24) : e === 31 ? (f ? NaN : sign * Infinity)
      : sign * (1 + f / 1024) * Math.pow(2, e - 15);
  }
  function values(a) {
    if (!a) return null;
    if (!a.v) {
      const bin = atob(a.data);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      if (a.dtype === "uint8") a.v = bytes;
      else {
        const view = new DataView(bytes.buffer);
        a.v = new Float32Array(bytes.length / 2);
        for (let i = 0; i < a.v.length; i++) a.v[i] = HALF[view.getUint16(2 * i, true)];
      }
    }
    return a.v;
  }
  // the (last two dims) block at leading indices idx of an array with `shape`
  function block(a, idx) {
    const v = values(a);
    const shape = a.shape;
    const inner = shape[shape.length - 2] * shape[shape.length - 1];
    let offset = 0;
    for (let d = 0; d < idx.length; d++) offset = offset * shape[d] + idx[d];
    return v.subarray(offset * inner, (offset + 1) * inner);
  }

  // ------------------------------------------------------------------ the view
  const passes = D.passes;
  const pixels = D.probes.pixels; // (B, 3, H, W) uint8
  const [B, , H, W] = pixels.shape;
  const view = { pass: passes.length - 1, method: meta.methods[0], layer: meta.layer_names.length - 1, probe: 0,
    query: -1, scale: D.colour.scale === "per_map" ? "per_map" : "relative" };
  const kept = new Set((meta.layers || []).map(Number));
  // a long run's page keeps the token x token attention of some passes only (marked * beside the step)
  const thinned = kept.size > 0 && passes.some((q) => !Object.keys(q.matrices).length);

  // ------------------------------------------------------------------ maps and rows
  function fused(p, probe, layer) {
    const a = passes[p].matrices[String(layer)];
    return a ? block(a, [probe]) : null;
  }
  // Â = (F + I) with the discard_ratio smallest entries of F zeroed first (never [0, 0]), rows summing to 1
  const transitions = new Map();
  function transition(p, probe, layer) {
    const key = p + "/" + probe + "/" + layer;
    if (transitions.has(key)) return transitions.get(key);
    const f = fused(p, probe, layer);
    const n = Math.round(Math.sqrt(f.length));
    const a = Float64Array.from(f);
    const k = Math.floor(n * n * (meta.discard_ratio || 0));
    if (k > 0) {
      const order = [];
      for (let i = 1; i < n * n; i++) order.push(i);
      order.sort((x, y) => a[x] - a[y] || x - y);
      for (let i = 0; i < k; i++) a[order[i]] = 0;
    }
    for (let i = 0; i < n; i++) {
      a[i * n + i] += 1;
      let sum = 0;
      for (let j = 0; j < n; j++) sum += a[i * n + j];
      for (let j = 0; j < n; j++) a[i * n + j] /= sum;
    }
    if (transitions.size > 64) transitions.clear();
    transitions.set(key, a);
    return a;
  }
  // row `token` of the rollout after `layer`: e_token^T Â_layer Â_(layer-1) ... Â_0, over every token
  function rolloutRow(p, probe, layer, token) {
    const n = NP + PREFIX;
    let row = new Float64Array(n);
    row[token] = 1;
    for (let l = layer; l >= 0; l--) {
      const a = transition(p, probe, l);
      const next = new Float64Array(n);
      for (let i = 0; i < n; i++) {
        const r = row[i];
        if (r === 0) continue;
        for (let j = 0; j < n; j++) next[j] += r * a[i * n + j];
      }
      row = next;
    }
    return row;
  }
  function rolloutKept(pass, layer) {
    for (let l = 0; l <= layer; l++) if (!pass.matrices[String(l)]) return false;
    return true;
  }
  // the map of `probe` in the current view: {values over patches, source, note}
  function mapOf(probe, v) {
    const pass = passes[v.pass];
    if (v.query >= 0) {
      const token = PREFIX + v.query;
      const n = NP + PREFIX;
      if (v.method === "raw" && pass.matrices[String(v.layer)]) {
        return { values: fused(v.pass, probe, v.layer).subarray(token * n + PREFIX, (token + 1) * n), source: "raw row" };
      }
      if (v.method === "rollout" && rolloutKept(pass, v.layer)) {
        return { values: rolloutRow(v.pass, probe, v.layer, token).subarray(PREFIX), source: "rollout row" };
      }
      const why = !Object.keys(pass.matrices).length && kept.size
        ? "this page keeps the token x token attention of " + passes.filter((q) => Object.keys(q.matrices).length)
          .length + " passes (steps marked * on the slider label), not of this one"
        : v.method === "raw" || v.method === "rollout"
        ? "layer " + v.layer + (v.method === "rollout" ? " (or an earlier one)" : "") +
          " keeps no token x token attention (AttentionMonitor(report_layers=...))"
        : v.method + " explains the class score: it has no row per patch";
      return { values: block(pass.maps[v.method], [probe, v.layer]), source: "logged map",
        note: "patch " + v.query + " cannot be the query here: " + why + "; showing the logged map" };
    }
    return { values: block(pass.maps[v.method], [probe, v.layer]), source: "logged map" };
  }
  // colour positions: relative to uniform (log scale, RANGE x uniform at the top) or each map min-max stretched
  function positions(vals, scale) {
    let sum = 0, lo = Infinity, hi = -Infinity;
    for (const x of vals) { sum += x; lo = Math.min(lo, x); hi = Math.max(hi, x); }
    const shares = Array.from(vals, (x) => (sum > 0 ? x / sum : 0));
    let t;
    if (scale === "per_map") t = Array.from(vals, (x) => (hi > lo ? (x - lo) / (hi - lo) : 0));
    else t = shares.map((s) => (s > 0 ? Math.min(1, Math.max(0, 0.5 + 0.5 * Math.log(s * NP) / Math.log(RANGE))) : 0));
    const peak = sum > 0 ? (hi / sum) * NP : 0;
    // render.colorize's binning (matplotlib's): colour min(floor(256 t), 255)
    return { shares, t, colours: t.map((x) => Math.min(255, Math.floor(x * 256))), peak };
  }

  // ------------------------------------------------------------------ drawing
  function draw(canvas, probe, colours, query) {
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(W, H);
    const px = values(pixels);
    const plane = H * W;
    for (let y = 0; y < H; y++) {
      const row = Math.floor((y * GH) / H);
      for (let x = 0; x < W; x++) {
        const c = LUT[colours[row * GW + Math.floor((x * GW) / W)]];
        const o = (y * W + x) * 4;
        for (let ch = 0; ch < 3; ch++) {
          const img = px[(probe * 3 + ch) * plane + y * W + x] / 255;
          image.data[o + ch] = Math.round(255 * (ALPHA * c[ch] + (1 - ALPHA) * img));
        }
        image.data[o + 3] = 255;
      }
    }
    ctx.putImageData(image, 0, 0);
    if (query >= 0) { // outline the query patch
      const r = Math.floor(query / GW), c = query % GW;
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1;
      const x0 = Math.floor((c * W) / GW), y0 = Math.floor((r * H) / GH);
      ctx.strokeRect(x0 + 0.5, y0 + 0.5, Math.floor(((c + 1) * W) / GW) - x0 - 1, Math.floor(((r + 1) * H) / GH) - y0 - 1);
    }
  }
  function label(probe, p) {
    const names = meta.class_names;
    const name = (i) => (names && i >= 0 && i < names.length ? "=" + names[i] : String(i));
    let text = "#" + probe;
    if (D.probes.labels) text += " y" + name(D.probes.labels[probe]);
    const pred = passes[p].predicted;
    if (pred) text += " p" + name(pred[probe]);
    return text;
  }
  function tile(container, caption, chosen, onclick) {
    const div = document.createElement("div");
    div.className = "la-tile" + (chosen ? " la-chosen" : "");
    const canvas = document.createElement("canvas");
    div.appendChild(canvas);
    div.appendChild(document.createTextNode(caption));
    if (onclick) div.addEventListener("click", onclick);
    container.appendChild(div);
    return canvas;
  }
  function ticks() {
    const box = $("la-ticks");
    box.innerHTML = "";
    const marks = view.scale === "per_map" ? [[0, "min"], [1, "max"]]
      : [[0, "1/" + fmt(RANGE)], [0.25, "1/" + fmt(Math.sqrt(RANGE))], [0.5, "1 (uniform)"], [0.75, fmt(Math.sqrt(RANGE))],
        [1, fmt(RANGE) + " x uniform"]];
    for (const [t, text] of marks) {
      const span = document.createElement("span");
      span.style.left = 100 * t + "%";
      span.textContent = text;
      box.appendChild(span);
    }
  }
  function fmt(x) { return Number.isInteger(x) ? String(x) : x.toFixed(1); }
  function colourBar() {
    const ctx = $("la-bar").getContext("2d");
    for (let i = 0; i < 256; i++) {
      const c = LUT[i];
      ctx.fillStyle = "rgb(" + c.map((x) => Math.round(255 * x)).join(",") + ")";
      ctx.fillRect(i, 0, 1, 12);
    }
  }

  let drawn = null, headsDrawn = [];
  function render() {
    const p = view.pass, step = passes[p].step;
    $("la-step").value = String(p);
    const star = thinned && Object.keys(passes[p].matrices).length ? " *" : "";
    $("la-step-label").textContent = "step " + step + star + " (pass " + (p + 1) + " of " + passes.length + ")";
    $("la-method").value = view.method;
    $("la-layer").value = String(view.layer);
    $("la-probe").value = String(view.probe);
    $("la-scale").value = view.scale;
    // the chosen map
    const m = mapOf(view.probe, view);
    const pos = positions(m.values, view.scale);
    draw($("la-main"), view.probe, pos.colours, view.query);
    const layerName = meta.layer_names[view.layer];
    const query = view.query >= 0 ? "patch " + view.query + " (row " + Math.floor(view.query / GW) + ", column " +
      (view.query % GW) + ")" : "class query (" + (meta.query || "logged") + ")";
    $("la-caption").textContent = view.method + ", " + layerName + ", step " + step + ", " + label(view.probe, p) +
      "; query: " + query + "; " + m.source + "; peak " + pos.peak.toFixed(1) + " x uniform";
    $("la-note").textContent = m.note || (kept.size ? "" :
      "This run kept no token x token attention: the maps are those logged, for their own query " +
      "(AttentionMonitor(report_layers=...) keeps the rows a click needs).");
    drawn = { pass: p, step, method: view.method, layer: view.layer, probe: view.probe, query: view.query,
      source: m.source, scale: view.scale, values: Array.from(m.values), shares: pos.shares, t: pos.t,
      colours: pos.colours, peak: pos.peak, width: W, height: H, grid: [GH, GW] };
    // every probe in the same view
    const strip = $("la-probes");
    strip.innerHTML = "";
    for (let b = 0; b < B; b++) {
      const mb = mapOf(b, view);
      draw(tile(strip, label(b, p), b === view.probe, () => set({ probe: b })), b,
        positions(mb.values, view.scale).colours, view.query);
    }
    // one tile per head of the chosen layer
    const heads = $("la-heads");
    heads.innerHTML = "";
    headsDrawn = [];
    const rows = passes[p].heads[String(view.layer)];
    const full = passes[p].head_matrices[String(view.layer)];
    $("la-heads-title").textContent = "Heads of " + layerName;
    if (!rows) {
      heads.textContent = "no per-head maps of this layer (AttentionMonitor(head_layers=...))";
    } else {
      const count = rows.shape[1];
      const n = NP + PREFIX;
      for (let h = 0; h < count; h++) {
        let vals = block(rows, [view.probe, h]), source = "logged map";
        if (view.query >= 0 && full) {
          const token = PREFIX + view.query;
          vals = block(full, [view.probe, h]).subarray(token * n + PREFIX, (token + 1) * n);
          source = "raw row";
        }
        const hp = positions(vals, view.scale);
        draw(tile(heads, "h" + h + (view.query >= 0 && !full ? " (class query)" : ""), false, null), view.probe,
          hp.colours, source === "raw row" ? view.query : -1);
        headsDrawn.push({ head: h, source, values: Array.from(vals), t: hp.t, colours: hp.colours });
      }
    }
    ticks();
    markSteps(step);
    writeHash();
  }

  // ------------------------------------------------------------------ curves
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];
  const allSteps = passes.map((p) => p.step);
  function curves() {
    const box = $("la-curves");
    const w = 300, h = 130, pad = 28;
    for (const chart of D.curves) {
      let smin = Infinity, smax = -Infinity, vmin = Infinity, vmax = -Infinity;
      for (const line of chart.lines) {
        for (const s of line.steps) { smin = Math.min(smin, s); smax = Math.max(smax, s); }
        for (const v of line.values) if (isFinite(v)) { vmin = Math.min(vmin, v); vmax = Math.max(vmax, v); }
      }
      for (const s of allSteps) { smin = Math.min(smin, s); smax = Math.max(smax, s); }
      if (!(vmax > vmin)) { vmin -= 0.5; vmax += 0.5; }
      const sx = (s) => pad + ((s - smin) / Math.max(smax - smin, 1)) * (w - pad - 6);
      const sy = (v) => h - 14 - ((v - vmin) / (vmax - vmin)) * (h - 24);
      let svg = "<svg width='" + w + "' height='" + h + "' viewBox='0 0 " + w + " " + h + "'>";
      svg += "<text x='2' y='10'>" + fmt3(vmax) + "</text><text x='2' y='" + (h - 14) + "'>" + fmt3(vmin) + "</text>";
      svg += "<text x='" + pad + "' y='" + (h - 2) + "'>" + smin + "</text><text x='" + (w - 6) +
        "' y='" + (h - 2) + "' text-anchor='end'>" + smax + "</text>";
      chart.lines.forEach((line, i) => {
        const points = line.steps.map((s, k) => (isFinite(line.values[k]) ? sx(s).toFixed(1) + "," + sy(line.values[k]).toFixed(1) : null))
          .filter((x) => x);
        svg += "<polyline fill='none' stroke-width='1.5' stroke='" + PALETTE[i % PALETTE.length] + "' points='" +
          points.join(" ") + "'><title>" + esc(line.name) + "</title></polyline>";
      });
      for (const alert of D.alerts) {
        if (alert.curve && (alert.curve.startsWith(chart.title) || chart.title.startsWith(alert.curve))) {
          svg += "<path class='la-alert' d='M" + sx(alert.step).toFixed(1) + " 4 l-4 -4 h8 z' fill='#d00'><title>" +
            esc(alert.message) + "</title></path>";
        }
      }
      svg += "<line class='la-marker' x1='0' x2='0' y1='0' y2='" + (h - 12) + "' stroke='#000' stroke-dasharray='3,2'" +
        " data-x='" + JSON.stringify(allSteps.map((s) => +sx(s).toFixed(1))) + "'/></svg>";
      const div = document.createElement("div");
      div.className = "la-chart";
      div.innerHTML = svg;
      const legend = document.createElement("div");
      legend.innerHTML = "<b>" + esc(chart.title) + "</b> " + chart.lines.map((line, i) =>
        "<span style='color:" + PALETTE[i % PALETTE.length] + "'>" + esc(line.name) + "</span>").join(" ");
      div.insertBefore(legend, div.firstChild);
      box.appendChild(div);
    }
    const list = $("la-alerts");
    if (!D.alerts.length) list.innerHTML = "<li>none fired</li>";
    for (const alert of D.alerts) {
      const li = document.createElement("li");
      li.textContent = "step " + alert.step + ": " + alert.message;
      li.addEventListener("click", () => {
        const i = allSteps.findIndex((s) => s >= alert.step);
        set({ pass: i < 0 ? passes.length - 1 : i });
      });
      list.appendChild(li);
    }
  }
  function fmt3(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3); }
  function esc(s) { return String(s).replace(/[&<>'"]/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
  function markSteps() {
    for (const line of document.querySelectorAll(".la-marker")) {
      const x = JSON.parse(line.getAttribute("data-x"))[view.pass];
      line.setAttribute("x1", x);
      line.setAttribute("x2", x);
    }
  }

  // ------------------------------------------------------------------ view state, hash, controls
  function set(change) {
    Object.assign(view, change);
    view.pass = Math.max(0, Math.min(passes.length - 1, view.pass | 0));
    view.layer = Math.max(0, Math.min(meta.layer_names.length - 1, view.layer | 0));
    view.probe = Math.max(0, Math.min(B - 1, view.probe | 0));
    if (!(view.query >= 0 && view.query < NP)) view.query = -1;
    if (!meta.methods.includes(view.method)) view.method = meta.methods[0];
    render();
  }
  function writeHash() {
    const hash = "#step=" + passes[view.pass].step + "&method=" + view.method + "&layer=" + view.layer + "&probe=" +
      view.probe + "&query=" + (view.query >= 0 ? view.query : "class") + "&scale=" + view.scale;
    try {
      if (location.hash !== hash) history.replaceState(null, "", hash);
    } catch (e) { /* a sandboxed frame (notebook) has no history of its own */ }
  }
  function readHash() {
    const change = {};
    for (const part of (location.hash || "").replace(/^#/, "").split("&")) {
      const [key, value] = part.split("=");
      if (key === "step") {
        const i = allSteps.indexOf(Number(value));
        if (i >= 0) change.pass = i;
      } else if (key === "method" || key === "scale") change[key] = decodeURIComponent(value);
      else if (key === "layer" || key === "probe") change[key] = Number(value);
      else if (key === "query") change.query = value === "class" ? -1 : Number(value);
    }
    return change;
  }
  function options(select, items) {
    for (const [value, text] of items) {
      const o = document.createElement("option");
      o.value = String(value);
      o.textContent = text;
      select.appendChild(o);
    }
  }
  let timer = null;
  function play() {
    if (timer) {
      clearInterval(timer);
      timer = null;
      $("la-play").textContent = "Play";
      return;
    }
    if (view.pass === passes.length - 1) set({ pass: 0 });
    $("la-play").textContent = "Pause";
    timer = setInterval(() => {
      if (view.pass >= passes.length - 1) play();
      else set({ pass: view.pass + 1 });
    }, 700);
  }

  $("la-title").textContent = D.title;
  const slider = $("la-step");
  slider.max = String(passes.length - 1);
  slider.addEventListener("input", () => set({ pass: Number(slider.value) }));
  options($("la-method"), meta.methods.map((m) => [m, m]));
  options($("la-layer"), meta.layer_names.map((name, i) => [i, name + (kept.has(i) ? "" : meta.layers && meta.layers.length ? " (no patch rows)" : "")]));
  options($("la-probe"), Array.from({ length: B }, (_, b) => [b, label(b, passes.length - 1)]));
  $("la-method").addEventListener("change", (e) => set({ method: e.target.value }));
  $("la-layer").addEventListener("change", (e) => set({ layer: Number(e.target.value) }));
  $("la-probe").addEventListener("change", (e) => set({ probe: Number(e.target.value) }));
  $("la-scale").addEventListener("change", (e) => set({ scale: e.target.value }));
  $("la-class-query").addEventListener("click", () => set({ query: -1 }));
  $("la-play").addEventListener("click", play);
  $("la-main").addEventListener("click", (e) => {
    const canvas = e.currentTarget;
    const x = (e.offsetX / canvas.clientWidth) * W, y = (e.offsetY / canvas.clientHeight) * H;
    set({ query: Math.min(GH - 1, Math.floor((y * GH) / H)) * GW + Math.min(GW - 1, Math.floor((x * GW) / W)) });
  });
  window.addEventListener("hashchange", () => set(readHash()));
  colourBar();
  curves();
  window.lightningAttn = {
    view: () => Object.assign({}, view),
    set,
    drawn: () => drawn,
    heads: () => headsDrawn,
    rolloutRow: (p, probe, layer, token) => Array.from(rolloutRow(p, probe, layer, token)),
  };
  set(readHash());
})();
