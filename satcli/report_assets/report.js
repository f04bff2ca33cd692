// satcli report: renders one page of rows at a time from the embedded data, so that tens of thousands of images
// stay responsive; draws a word's attention over its image on a canvas when the word is hovered or clicked.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("satcli-data").textContent);
  // [path, caption, tokens, sum_logprob, finished, error, grid_h, grid_w, attention, peaks, thumb, width, height,
  //  probs: each word's probability given the words before it, or null for files written without them,
  //  alternatives: [caption, sum_logprob] of the runners-up (--n-best) or null, note: why there is no picture]
  const ROWS = DATA.rows;
  const PATH = 0, CAPTION = 1, TOKENS = 2, SUM = 3, FINISHED = 4, ERROR = 5, GH = 6, GW = 7, ATT = 8, PEAKS = 9,
        THUMB = 10, WIDTH = 11, HEIGHT = 12, PROBS = 13, ALTERNATIVES = 14, NOTE = 15;
  // evaluate's predictions: per row [references, bleu4, cider_d, objects named, objects present] (or null); null
  // for caption results
  const EVALUATED = DATA.evaluated;
  const REFS = 0, BLEU4 = 1, CIDER = 2, NAMED = 3, PRESENT = 4;
  const PAGE_SIZE = DATA.page_size;
  const BOX = DATA.thumb_size;
  const FLOOR = DATA.blend[0], GAIN = DATA.blend[1]; // the same blend as the PNG overlays
  const LUT = new Uint8Array(DATA.lut.match(/../g).map((h) => parseInt(h, 16)));

  const $ = (id) => document.getElementById(id);
  const list = $("rows"), search = $("search"), sort = $("sort"), count = $("count");
  const prev = $("prev"), next = $("next"), pageLabel = $("page");
  const haystack = ROWS.map((r) => ((r[CAPTION] || "") + "\n" + r[PATH] + "\n" + (r[ERROR] || "")).toLowerCase());
  const selected = new Map(); // row index → the word clicked
  let shown = ROWS.map((_, i) => i);
  let page = 0;

  // The mean log-probability per written token (words and <end>): comparable across caption lengths.
  const perWord = (r) => (r[SUM] === null ? null : r[SUM] / ((r[TOKENS] || []).length + (r[FINISHED] ? 1 : 0) || 1));

  // "probability 0.83, " for word t, or "" when the file does not say.
  const probability = (r, t) => (r[PROBS] && r[PROBS][t] != null ? `probability ${r[PROBS][t].toFixed(2)}, ` : "");

  function attention(r, t) {
    // Grids are stored as bytes, each scaled so its largest weight is 255.
    const cells = r[GH] * r[GW];
    const bytes = atob(r[ATT]);
    const grid = new Float32Array(cells);
    for (let k = 0; k < cells; k++) grid[k] = bytes.charCodeAt(t * cells + k) / 255;
    return grid;
  }

  function overlay(r, t, width, height) {
    // Bilinear upsampling with cell (i, j) covering [i·H/gh, (i+1)·H/gh) × [j·W/gw, (j+1)·W/gw): smooth, and the
    // geometry of the model's view of the squashed image. Alpha blending does (1 − w)·image + w·colour.
    const gh = r[GH], gw = r[GW], grid = attention(r, t);
    const canvas = document.createElement("canvas");
    canvas.width = width; canvas.height = height;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(width, height);
    const px = out.data;
    for (let y = 0; y < height; y++) {
      const gy = Math.min(Math.max((y + 0.5) * gh / height - 0.5, 0), gh - 1);
      const y0 = Math.floor(gy), y1 = Math.min(y0 + 1, gh - 1), fy = gy - y0;
      for (let x = 0; x < width; x++) {
        const gx = Math.min(Math.max((x + 0.5) * gw / width - 0.5, 0), gw - 1);
        const x0 = Math.floor(gx), x1 = Math.min(x0 + 1, gw - 1), fx = gx - x0;
        const top = grid[y0 * gw + x0] * (1 - fx) + grid[y0 * gw + x1] * fx;
        const bottom = grid[y1 * gw + x0] * (1 - fx) + grid[y1 * gw + x1] * fx;
        const heat = top * (1 - fy) + bottom * fy;
        const c = Math.round(heat * 255) * 3, o = (y * width + x) * 4;
        px[o] = LUT[c]; px[o + 1] = LUT[c + 1]; px[o + 2] = LUT[c + 2];
        px[o + 3] = Math.round((FLOOR + GAIN * heat) * 255);
      }
    }
    ctx.putImageData(out, 0, 0);
    return canvas;
  }

  function draw(card, t) {
    const r = ROWS[card.index], canvas = card.canvas, ctx = canvas.getContext("2d");
    ctx.fillStyle = "#3c3c3c";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (card.image && card.image.complete && card.image.naturalWidth) {
      ctx.drawImage(card.image, 0, 0, canvas.width, canvas.height);
    } else if (!r[THUMB]) {
      ctx.fillStyle = "#bbb"; ctx.font = "12px system-ui, sans-serif";
      ctx.fillText(r[NOTE] || "image not found", 8, 18);
    }
    if (t !== null && t !== undefined && r[ATT]) ctx.drawImage(overlay(r, t, canvas.width, canvas.height), 0, 0);
    canvas.dataset.word = t === null || t === undefined ? "" : String(t);
    card.look.textContent = t === null || t === undefined ? "" :
      `“${r[TOKENS][t]}”: ${probability(r, t)}word ${t + 1} of ${r[TOKENS].length}, ` +
      `${Math.round(100 * r[PEAKS][t])}% of the gaze on its brightest cell`;
  }

  function size(r) {
    const w = r[WIDTH] || 1, h = r[HEIGHT] || 1, scale = BOX / Math.max(w, h);
    return [Math.max(1, Math.round(w * scale)), Math.max(1, Math.round(h * scale))];
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function card(index) {
    const r = ROWS[index];
    const row = el("article", "row");
    row.dataset.index = index;
    const canvas = el("canvas");
    if (r[NOTE]) canvas.setAttribute("aria-label", r[NOTE]);
    [canvas.width, canvas.height] = size(r);
    const text = el("div", "text");
    const c = { index, canvas, look: el("p", "look"), image: null };
    if (r[ERROR] !== null) text.append(el("p", "error", r[ERROR]));
    if (r[TOKENS]) {
      const caption = el("p", "caption");
      r[TOKENS].forEach((word, t) => {
        const span = el("span", "w", word);
        span.dataset.t = t;
        if (probability(r, t)) span.title = `${probability(r, t).slice(0, -2)} given the words before`;
        if (selected.get(index) === t) span.classList.add("sel");
        span.addEventListener("mouseenter", () => draw(c, t));
        span.addEventListener("click", () => {
          const again = selected.get(index) === t;
          caption.querySelectorAll(".sel").forEach((s) => s.classList.remove("sel"));
          if (again) selected.delete(index); else { selected.set(index, t); span.classList.add("sel"); }
          draw(c, again ? null : t);
        });
        caption.append(span, " ");
      });
      caption.addEventListener("mouseleave", () => draw(c, selected.get(index)));
      text.append(caption);
    }
    if (r[ALTERNATIVES]) {
      const others = el("ol", "alternatives");
      others.start = 2;
      for (const [other, logp] of r[ALTERNATIVES]) {
        others.append(el("li", "", logp === null ? other : `${other} (log p ${logp.toFixed(2)})`));
      }
      text.append(others);
    }
    if (EVALUATED && EVALUATED[index]) text.append(...evaluation(EVALUATED[index]));
    const meta = [r[PATH]];
    if (r[SUM] !== null) {
      meta.push(`log p ${r[SUM].toFixed(2)}`, `${(100 * Math.exp(perWord(r))).toFixed(0)}% per word (geometric mean)`);
      if (!r[FINISHED]) meta.push("cut at the length limit");
    }
    if (r[WIDTH]) meta.push(`${r[WIDTH]}×${r[HEIGHT]}`);
    text.append(el("p", "meta", meta.join(" · ")), c.look);
    row.append(canvas, text);
    if (r[THUMB]) {
      c.image = new Image();
      c.image.onload = () => draw(c, selected.get(index));
      c.image.onerror = () => { c.image = null; draw(c, selected.get(index)); };
      c.image.src = r[THUMB];
    }
    draw(c, selected.get(index));
    return row;
  }

  // The references (collapsed), the image's scores and, on splits with objects, those named, missed and invented.
  function evaluation(e) {
    const nodes = [];
    if (e[REFS]) {
      const refs = el("details", "refs");
      refs.append(el("summary", "", `${e[REFS].length} reference${e[REFS].length === 1 ? "" : "s"}`));
      const items = el("ol");
      for (const ref of e[REFS]) items.append(el("li", "", ref));
      refs.append(items);
      nodes.push(refs);
    }
    const scores = [];
    if (e[BLEU4] !== null) scores.push(`BLEU-4 ${e[BLEU4].toFixed(2)}`);
    if (e[CIDER] !== null) scores.push(`CIDEr-D ${e[CIDER].toFixed(2)}`);
    if (scores.length) {
      const p = el("p", "scores", scores.join(" · "));
      if (e[CIDER] !== null) p.dataset.ciderD = String(e[CIDER]);
      nodes.push(p);
    }
    if (e[PRESENT] !== null && e[NAMED] !== null) {
      const named = new Set(e[NAMED]), present = new Set(e[PRESENT]);
      const list = (xs) => (xs.length ? xs.join(", ") : "none");
      nodes.push(el("p", "objects", `objects named: ${list(e[NAMED].filter((o) => present.has(o)))} · ` +
        `missed: ${list(e[PRESENT].filter((o) => !named.has(o)))} · ` +
        `invented: ${list(e[NAMED].filter((o) => !present.has(o)))}`));
    }
    return nodes;
  }

  function render() {
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    page = Math.min(Math.max(page, 0), pages - 1);
    const fragment = document.createDocumentFragment();
    for (const index of shown.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)) fragment.append(card(index));
    if (!shown.length) fragment.append(el("p", "empty", "No caption matches the search."));
    list.replaceChildren(fragment);
    const total = ROWS.length.toLocaleString("en");
    count.textContent = shown.length === ROWS.length ? `${total} images` :
      `${shown.length.toLocaleString("en")} of ${total} images match`;
    pageLabel.textContent = `page ${page + 1} of ${pages}`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  function filter() {
    const terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    shown = [];
    for (let i = 0; i < ROWS.length; i++) {
      if (terms.every((term) => haystack[i].includes(term))) shown.push(i);
    }
    const key = {
      worst: (i) => perWord(ROWS[i]) ?? Infinity,
      best: (i) => -(perWord(ROWS[i]) ?? -Infinity),
      errors: (i) => (ROWS[i][ERROR] === null ? 1 : 0),
      "cider-worst": (i) => cider(i) ?? Infinity,
      "cider-best": (i) => -(cider(i) ?? -Infinity),
    }[sort.value];
    if (key) {
      const keys = new Map(shown.map((i) => [i, key(i)]));
      shown.sort((a, b) => keys.get(a) - keys.get(b) || a - b);
    }
    page = 0;
    render();
  }

  const cider = (i) => (EVALUATED && EVALUATED[i] ? EVALUATED[i][CIDER] : null);

  let pending = 0;
  search.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(filter, 150); });
  sort.addEventListener("change", filter);
  prev.addEventListener("click", () => { page--; render(); window.scrollTo(0, 0); });
  next.addEventListener("click", () => { page++; render(); window.scrollTo(0, 0); });
  $("about").textContent = DATA.about;
  $("limited").textContent = DATA.note;
  $("limited").hidden = !DATA.note;
  if (EVALUATED && EVALUATED.some((e) => e && e[CIDER] !== null)) sort.value = "cider-worst";
  else sort.querySelectorAll("option[value^='cider']").forEach((o) => o.remove());
  filter();
  document.body.dataset.ready = "1";
})();
