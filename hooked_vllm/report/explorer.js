// The report's item explorer: the model's answer, saliency on the image (every layer, every head),
// the logit lens on the image grid and at the last position. Data: the JSON in
// <script id="explorer-data"> (hooked_vllm/report/explorer.py, payload()). No network, no libraries.
// Layers are TransformerLens's block indices: saliency layer l is block l's attention (0 to L-1),
// lens layer l the stream block l reads (0: the embedding, L: the final stream).
// The picture is drawn untouched unless the user asks for the blended overlay ("overlay": "blend").
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  const $ = (id) => document.getElementById(id);
  const state = {
    item: 0, source: "text", head: 0, layer: 0, lensLayer: 0, shared: false, opacity: 0.6,
    overlay: "outline", top: 0.1,
    salHover: null, lensHover: null, // the cell last hovered on this item: {tile, row, col, patch}
  };
  const decoded = new Map(); // item index -> {text, last}: Uint16Array per source

  function colour(t) {
    if (!Number.isFinite(t)) return [0, 0, 0];
    const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
    return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
  }
  // IEEE half precision (the maps are float16 of value / frame scale; explorer.py, _encoded)
  function half(h) {
    const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }
  function codes(item, index) {
    if (!decoded.has(index)) {
      const out = {};
      for (const source of ["text", "last"]) {
        const bytes = Uint8Array.from(atob(item.saliency[source].data), (c) => c.charCodeAt(0));
        out[source] = Float64Array.from(new Uint16Array(bytes.buffer), half);
      }
      decoded.set(index, out);
    }
    return decoded.get(index);
  }
  // One frame (source, head, layer): the patch values, and the colour scale's ends.
  function frame(item, index) {
    const sal = item.saliency[state.source];
    const nHeads = item.n_heads + 1, n = item.n_patches;
    const f = state.layer * nHeads + state.head; // layer l: block l's attention
    const raw = codes(item, index)[state.source].subarray(f * n, (f + 1) * n);
    const values = Array.from(raw, (v) => v * sal.scale[f]);
    let low = sal.low[f], high = sal.high[f];
    if (state.shared) { // one scale over every layer of this head and source
      low = Infinity; high = -Infinity;
      for (let l = 0; l < item.n_layers; l++) {
        low = Math.min(low, sal.low[l * nHeads + state.head]);
        high = Math.max(high, sal.high[l * nHeads + state.head]);
      }
    }
    return { values, low, high };
  }
  function fmt(v) { return Number.isFinite(v) ? v.toPrecision(3) : "none"; }

  // Tile 0 of a spatial layout lies over the picture; other tiles (crops) and non-spatial tokens
  // (InstructBLIP's Q-Former queries) get a grid of their own.
  const overImage = (item, tile) => item.spatial && tile.tile === 0;
  // Canvases of one tile: over the picture, the picture itself and (saliency) the heat map beside it.
  function tileCanvases(container, item, tile, image, withHeat) {
    const fig = document.createElement("figure");
    const over = overImage(item, tile);
    const side = over ? 384 : Math.max(96, Math.min(768, 24 * Math.max(tile.rows, tile.cols)));
    const aspect = over ? image.naturalHeight / image.naturalWidth : tile.rows / tile.cols;
    const make = () => {
      const canvas = document.createElement("canvas");
      canvas.width = side; canvas.height = Math.max(24, Math.round(side * aspect));
      return canvas;
    };
    const canvases = [make()];
    if (over && withHeat) canvases.push(make());
    const row = document.createElement("div");
    row.className = "tiles";
    row.append(...canvases);
    const caption = document.createElement("figcaption");
    caption.textContent = !item.spatial
      ? `${tile.rows * tile.cols} image tokens that are not image regions (e.g. Q-Former queries): not drawn over the image`
      : over ? (item.cropped ? "tile 0: the centre of the image, the part the model sees (its processor crops)" : "tile 0: the whole image")
      : `tile ${tile.tile} (a crop, on its own grid)`;
    fig.append(row, caption);
    container.append(fig);
    return canvases;
  }
  // The picture as it is: pixels repeated where it is enlarged 2x or more (small synthetic images
  // keep their exact colours and edges), smoothed where it is shrunk or barely enlarged.
  function drawPicture(ctx, image, canvas) {
    ctx.imageSmoothingEnabled = canvas.width < 2 * image.naturalWidth;
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = true;
  }
  function paintCells(ctx, canvas, tile, values, low, high) {
    const w = canvas.width / tile.cols, h = canvas.height / tile.rows;
    tile.index.forEach((patch, cell) => {
      if (patch < 0) return;
      const [r, g, b] = colour((values[patch] - low) / (high - low || 1));
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      const x = (cell % tile.cols) * w, y = Math.floor(cell / tile.cols) * h;
      ctx.fillRect(Math.floor(x), Math.floor(y), Math.ceil(w), Math.ceil(h));
    });
  }
  // The cells to outline: the top 1 or the top fraction of this frame's cells (ties included), never
  // one at the frame's minimum (a flat frame has none).
  function topCells(values) {
    const finite = values.filter(Number.isFinite).sort((a, b) => b - a);
    const chosen = new Set();
    if (!finite.length) return chosen;
    const k = state.top >= 1 ? 1 : Math.max(1, Math.ceil(state.top * finite.length));
    const threshold = finite[k - 1], minimum = finite[finite.length - 1];
    values.forEach((v, patch) => { if (v >= threshold && v > minimum) chosen.add(patch); });
    return chosen;
  }
  // The outline of the chosen cells (the edges between a chosen cell and any other), black under
  // white so that it shows on any picture; nothing else of the picture is touched.
  function outline(ctx, canvas, tile, chosen) {
    const w = canvas.width / tile.cols, h = canvas.height / tile.rows;
    const inside = (row, col) => row >= 0 && col >= 0 && row < tile.rows && col < tile.cols
      && chosen.has(tile.index[row * tile.cols + col]);
    ctx.beginPath();
    tile.index.forEach((patch, cell) => {
      if (!chosen.has(patch)) return;
      const row = Math.floor(cell / tile.cols), col = cell % tile.cols;
      const x0 = Math.round(col * w), x1 = Math.round((col + 1) * w);
      const y0 = Math.round(row * h), y1 = Math.round((row + 1) * h);
      if (!inside(row - 1, col)) { ctx.moveTo(x0, y0); ctx.lineTo(x1, y0); }
      if (!inside(row + 1, col)) { ctx.moveTo(x0, y1); ctx.lineTo(x1, y1); }
      if (!inside(row, col - 1)) { ctx.moveTo(x0, y0); ctx.lineTo(x0, y1); }
      if (!inside(row, col + 1)) { ctx.moveTo(x1, y0); ctx.lineTo(x1, y1); }
    });
    ctx.lineCap = "square";
    ctx.strokeStyle = "#000"; ctx.lineWidth = 4; ctx.stroke();
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.stroke();
  }
  function cellAt(canvas, tile, event) {
    // offsetX/Y and clientWidth/Height: the content box (the CSS border is not part of the grid)
    const col = Math.floor((event.offsetX / canvas.clientWidth) * tile.cols);
    const row = Math.floor((event.offsetY / canvas.clientHeight) * tile.rows);
    if (row < 0 || col < 0 || row >= tile.rows || col >= tile.cols) return null;
    return { row, col, patch: tile.index[row * tile.cols + col] };
  }

  function drawSaliency() {
    const index = state.item, item = DATA.items[index];
    const { values, low, high } = frame(item, index);
    const chosen = topCells(values);
    const image = $("thumb-" + index);
    for (const tile of item.tiles) {
      const canvas = $(`sal-${index}-${tile.tile}`);
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      const frameName = `${state.source}/${state.head}/${state.layer}`;
      if (overImage(item, tile)) {
        drawPicture(ctx, image, canvas);
        if (state.overlay === "blend") {
          ctx.globalAlpha = state.opacity;
          paintCells(ctx, canvas, tile, values, low, high);
          ctx.globalAlpha = 1;
        } else if (state.overlay === "outline") {
          outline(ctx, canvas, tile, chosen);
        }
        const heat = $(`sal-${index}-${tile.tile}-heat`);
        heat.hidden = state.overlay === "blend";
        const heatCtx = heat.getContext("2d");
        heatCtx.clearRect(0, 0, heat.width, heat.height);
        paintCells(heatCtx, heat, tile, values, low, high);
        heat.dataset.frame = frameName;
      } else {
        paintCells(ctx, canvas, tile, values, low, high);
      }
      canvas.dataset.frame = frameName;
    }
    $("bar-low").textContent = fmt(low);
    $("bar-high").textContent = fmt(high);
    const who = state.source === "text" ? "the instruction (summed over its tokens)" : "the last position";
    const head = state.head === 0 ? "all heads: ||sum_h alpha_h f_h(x)||" : `head ${state.head - 1}: alpha_h ||f_h(x)||`;
    const outlined = state.overlay === "outline" && item.spatial
      ? `; outlined on the picture: the ${chosen.size} cell${chosen.size === 1 ? "" : "s"} with the highest values` : "";
    $("sal-title").textContent = `Layer ${state.layer} (block ${state.layer}'s attention; layers 0 to ${item.n_layers - 1}), ${head}, received from ${who}${outlined}`;
    $("layer-label").textContent = `layer ${state.layer}`;
    $("opacity").disabled = state.overlay !== "blend";
    salReadout();
  }

  function drawLens() {
    const index = state.item, item = DATA.items[index];
    const words = item.lens_grid[state.lensLayer];
    const image = $("thumb-" + index);
    for (const tile of item.tiles) {
      const canvas = $(`lens-${index}-${tile.tile}`);
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      if (overImage(item, tile)) drawPicture(ctx, image, canvas); // untouched, words with a halo on it
      else { ctx.fillStyle = "#f4f4f4"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
      const w = canvas.width / tile.cols, h = canvas.height / tile.rows;
      ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.lineJoin = "round";
      ctx.font = `${Math.max(7, Math.min(14, Math.floor(h * 0.45)))}px sans-serif`;
      tile.index.forEach((patch, cell) => {
        if (patch < 0) return;
        const text = DATA.vocab[words[patch]].trim() || "\u2423";
        const shown = text.slice(0, Math.max(2, Math.floor(w / 6)));
        const x = (cell % tile.cols + 0.5) * w, y = (Math.floor(cell / tile.cols) + 0.5) * h;
        ctx.strokeStyle = "#fff"; ctx.lineWidth = 3; ctx.strokeText(shown, x, y);
        ctx.fillStyle = "#000"; ctx.fillText(shown, x, y);
      });
      canvas.dataset.frame = `lens/${state.lensLayer}`;
    }
    $("lens-label").textContent = lensName(state.lensLayer, item);
    lensReadout();
  }
  function lensName(layer, item) {
    return layer === 0 ? "layer 0 (embedding)" : layer === item.n_layers ? `layer ${layer} (the final stream)` : `layer ${layer}`;
  }

  function prompt(item) {
    const box = $("prompt");
    box.replaceChildren();
    let run = 0;
    item.tokens.forEach(([text, modality], k) => {
      if (modality === "image") {
        run++;
        const next = item.tokens[k + 1];
        if (next && next[1] === "image") return;
        const span = document.createElement("span");
        span.className = "tok image";
        span.textContent = `[${run} image-patch tokens]`;
        box.append(span);
        run = 0;
        return;
      }
      const span = document.createElement("span");
      span.className = "tok " + modality;
      span.textContent = text;
      span.title = `position ${k}: ${modality}`;
      box.append(span);
    });
  }

  function lensTable(item) {
    const table = $("lens-last");
    table.replaceChildren();
    const header = table.insertRow();
    ["layer", ...item.lens_last[0].map((_, k) => `top ${k + 1}`)].forEach((t) => {
      const th = document.createElement("th"); th.textContent = t; header.append(th);
    });
    item.lens_last.forEach((entries, layer) => {
      const row = table.insertRow();
      row.insertCell().textContent = layer === 0 ? "0 (embedding)" : layer === item.n_layers ? `${layer} (final)` : String(layer);
      for (const [word, p] of entries) row.insertCell().textContent = `${JSON.stringify(DATA.vocab[word])} ${p === null ? "none" : p.toFixed(3)}`;
    });
  }

  // The model's answer and, where the item has a label, whether it is right.
  function answer(item) {
    const box = $("item-answer");
    box.replaceChildren();
    const line = (...parts) => {
      const div = document.createElement("div");
      for (const part of parts) {
        if (typeof part === "string") { div.append(part); continue; }
        const [tag, text, cls] = part;
        const el = document.createElement(tag);
        el.textContent = text;
        if (cls) el.className = cls;
        div.append(el);
      }
      box.append(div);
    };
    if (item.answer === null || item.answer === undefined) {
      line("The model's answer was not computed for this item.");
      return;
    }
    line("The model answers ", ["q", item.answer], item.answer_cut ? " (cut: no end of answer yet)" : "");
    if (item.label !== null && item.label !== undefined) {
      line("Expected ", ["q", item.label], ": ", item.correct ? ["span", "right", "right"] : ["span", "wrong", "wrong"]);
    } else {
      line("This item has no expected answer to check against.");
    }
  }

  function show(index) {
    state.item = index;
    const item = DATA.items[index];
    state.salHover = state.lensHover = null; // nothing hovered on this item yet
    $("sal-hover").textContent = ""; $("lens-hover").textContent = "";
    $("item-title").textContent = `Item ${item.id}: ${item.instruction}`;
    answer(item);
    document.querySelectorAll("#item-index a").forEach((a) => a.classList.toggle("current", Number(a.dataset.item) === index));
    prompt(item);
    const heads = $("head");
    heads.replaceChildren();
    for (let h = 0; h <= item.n_heads; h++) {
      const option = document.createElement("option");
      option.value = h; option.textContent = h === 0 ? "all heads" : `head ${h - 1}`;
      heads.append(option);
    }
    state.head = Math.min(state.head, item.n_heads); heads.value = state.head;
    const layer = $("layer"); layer.max = item.n_layers - 1; state.layer = Math.min(state.layer, item.n_layers - 1); layer.value = state.layer;
    const lens = $("lens-layer"); lens.max = item.n_layers; state.lensLayer = Math.min(state.lensLayer, item.n_layers); lens.value = state.lensLayer;
    const image = new Image();
    image.id = "thumb-" + index;
    image.alt = `the image of item ${item.id}`;
    image.onload = () => {
      if (state.item !== index) return; // another item was picked while this one loaded
      // shown whole, 320 pixels on its long side; pixels repeated where that enlarges it 2x or more
      const scale = 320 / Math.max(image.naturalWidth, image.naturalHeight);
      image.width = Math.round(image.naturalWidth * scale); image.height = Math.round(image.naturalHeight * scale);
      image.style.imageRendering = scale >= 2 ? "pixelated" : "auto";
      for (const [prefix, boxId] of [["sal", "saliency-tiles"], ["lens", "lens-tiles"]]) {
        const box = $(boxId); box.replaceChildren();
        for (const tile of item.tiles) {
          const canvases = tileCanvases(box, item, tile, image, prefix === "sal");
          canvases.forEach((canvas, k) => {
            canvas.id = `${prefix}-${index}-${tile.tile}` + (k ? "-heat" : "");
            canvas.addEventListener("mousemove", (event) => hover(prefix, item, tile, canvas, event));
          });
        }
      }
      drawSaliency(); drawLens();
      document.body.dataset.explorerReady = String(index);
    };
    $("picture").replaceChildren(image);
    image.src = item.thumbnail;
    lensTable(item);
  }

  // Hovering remembers the cell; the readouts are rewritten from it at every redraw, so they always
  // name, and hold the value of, the layer, head and source on screen.
  function hover(prefix, item, tile, canvas, event) {
    const cell = cellAt(canvas, tile, event);
    if (!cell || cell.patch < 0 || item !== DATA.items[state.item]) return;
    if (prefix === "sal") { state.salHover = { tile, ...cell }; salReadout(); }
    else { state.lensHover = { tile, ...cell }; lensReadout(); }
  }
  const whereText = (at) => `tile ${at.tile.tile}, row ${at.row}, col ${at.col} (patch ${at.patch})`;
  function salReadout() {
    const at = state.salHover;
    if (!at) { $("sal-hover").textContent = ""; return; }
    const { values } = frame(DATA.items[state.item], state.item);
    const head = state.head === 0 ? "all heads" : `head ${state.head - 1}`;
    $("sal-hover").textContent = `${whereText(at)}, layer ${state.layer}, ${head}: ${fmt(values[at.patch])}`;
  }
  function lensReadout() {
    const at = state.lensHover;
    if (!at) { $("lens-hover").textContent = ""; return; }
    const word = DATA.vocab[DATA.items[state.item].lens_grid[state.lensLayer][at.patch]];
    $("lens-hover").textContent = `${whereText(at)}, layer ${state.lensLayer}: top-1 ${JSON.stringify(word)}`;
  }

  function bar() {
    const canvas = $("bar"), ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) {
      const [r, g, b] = colour(x / (canvas.width - 1));
      ctx.fillStyle = `rgb(${r},${g},${b})`; ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  $("source").addEventListener("change", (e) => { state.source = e.target.value; drawSaliency(); });
  $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); drawSaliency(); });
  $("layer").addEventListener("input", (e) => { state.layer = Number(e.target.value); drawSaliency(); });
  $("shared").addEventListener("change", (e) => { state.shared = e.target.checked; drawSaliency(); });
  $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value); drawSaliency(); });
  $("overlay").addEventListener("change", (e) => { state.overlay = e.target.value; drawSaliency(); });
  $("top").addEventListener("change", (e) => { state.top = Number(e.target.value); drawSaliency(); });
  $("lens-layer").addEventListener("input", (e) => { state.lensLayer = Number(e.target.value); drawLens(); });
  function fromHash() {
    const match = /^#item-(\d+)$/.exec(location.hash);
    const index = match ? Number(match[1]) : 0;
    if (index < DATA.items.length) show(index);
  }
  window.addEventListener("hashchange", fromHash);
  bar();
  if (DATA.items.length) fromHash();
})();
