// memopt's interactive report: draws each run of the page's memopt-timeline JSON (see report_html.py).
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("memopt-timeline").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  const PHASE_FILL = {forward: "#eef5ff", backward: "#fff4e6", optimizer: "#f3f0ff", prefill: "#eef5ff",
                      decode: "#fff4e6"};
  const SCALE = Math.max(1, ...DATA.runs.map((r) => r.peak_bytes));  // one scale for every run

  function human(n) {  // binary units, as memopt prints them
    let u = 0, v = Math.abs(n);
    while (v >= 1024 && u < UNITS.length - 1) { v /= 1024; u++; }
    return (n < 0 ? "-" : "") + (u === 0 ? v.toFixed(0) : v.toFixed(2)) + " " + UNITS[u];
  }
  function exact(n) {  // 1,196,320 B: the same digits in every locale
    const s = String(Math.abs(Math.round(n)));
    let out = "";
    for (let i = 0; i < s.length; i++) {
      if (i && (s.length - i) % 3 === 0) out += ",";
      out += s[i];
    }
    return (n < 0 ? "-" : "") + out + " B";
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function sv(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    return e;
  }

  function table(caption, head, rows, numeric) {
    const t = el("table");
    t.appendChild(el("caption", {class: "visually-hidden"}, caption));
    const tr = el("tr");
    head.forEach((h, i) => tr.appendChild(el("th", {scope: "col", class: numeric.includes(i) ? "num" : ""}, h)));
    const thead = el("thead");
    thead.appendChild(tr);
    t.appendChild(thead);
    const tbody = el("tbody");
    rows.forEach((r) => {
      const row = el("tr");
      r.forEach((c, i) => {
        const td = el("td", {class: numeric.includes(i) ? "num" : ""});
        if (c instanceof Node) td.appendChild(c);
        else td.textContent = c === null || c === undefined ? "-" : String(c);
        row.appendChild(td);
      });
      tbody.appendChild(row);
    });
    t.appendChild(tbody);
    const box = el("div", {class: "scroll", tabindex: "0", role: "region", "aria-label": caption});
    box.appendChild(t);
    return box;
  }

  function runSection(run, k) {
    const sec = el("section", {class: "run", "aria-label": "run " + run.name});
    sec.appendChild(el("h2", {}, run.name + ": peak " + human(run.peak_bytes) + " (" + exact(run.peak_bytes) + ")"));
    sec.appendChild(el("p", {class: "readout"}, "peak during " + (run.peak_phase || "-") +
      (run.peak_module ? " in " + run.peak_module : "") + "; " + run.events + " events"));
    const legend = el("div", {class: "legend"});
    run.categories.forEach((c, i) => {
      const s = el("span");
      s.appendChild(el("i", {style: "background:" + run.colors[i]}));
      s.appendChild(document.createTextNode(c + " " + human(run.peak_breakdown[c] || 0)));
      legend.appendChild(s);
    });
    sec.appendChild(legend);
    sec.appendChild(chart(run, k));
    const alive = run.alive_at_peak.map((t) => {
      const where = t.op || "(registered)";
      let cell = document.createTextNode(where);
      if (t.frames && t.frames.length) {
        cell = el("details");
        cell.appendChild(el("summary", {}, where));
        cell.appendChild(el("pre", {}, t.frames.join("\n")));
      }
      return [human(t.bytes), t.category, t.shape ? "[" + t.shape.join(", ") + "]" : null, t.dtype, cell, t.module,
              t.phase];
    });
    const shown = run.alive_count > run.alive_at_peak.length ? "; the " + run.alive_at_peak.length + " largest shown" : "";
    sec.appendChild(el("h3", {}, "Tensors alive at the peak, largest first (" + run.alive_count + ", " +
      human(run.alive_bytes) + shown + ")"));
    if (!run.stacks) sec.appendChild(el("p", {class: "help"}, "Run with --stacks to see where in Python each was made."));
    sec.appendChild(table("tensors alive at the peak", ["size", "category", "shape", "dtype", "made by", "module",
                                                         "phase"], alive, [0]));
    sec.appendChild(el("h3", {}, "Peak per phase"));
    sec.appendChild(table("peak per phase", ["phase", "peak"], run.phase_peaks.map((p) => [p[0], human(p[1])]), [1]));
    sec.appendChild(el("h3", {}, "Peak per module (while it ran)"));
    sec.appendChild(table("peak per module", ["module", "peak"], run.module_peaks.map((p) => [p[0], human(p[1])]),
                          [1]));
    return sec;
  }

  function chart(run, k) {
    const S = run.samples, n = S.index.length;
    const W = 720, H = 300, L = 64, R = 10, T = 18, B = 34;
    const totals = S.bytes.map((b) => b.reduce((a, x) => a + x, 0));
    const peakAt = S.index.indexOf(run.peak_index);
    let lo = 0, hi = n - 1, cursor = -1;
    const box = el("div", {class: "chart", tabindex: "0", role: "application", id: "chart-" + k,
      "aria-label": "memory timeline of " + run.name + ", peak " + human(run.peak_bytes) +
        ". Arrow keys move, plus and minus zoom, 0 resets, p goes to the peak."});
    const svg = sv("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "live tensor memory over the step"});
    box.appendChild(svg);
    const tip = el("div", {class: "tip", id: "tip-" + k});
    box.appendChild(tip);
    const readout = el("p", {class: "readout", id: "readout-" + k, role: "status", "aria-live": "polite"});
    const wrap = el("div");
    wrap.appendChild(box);
    wrap.appendChild(readout);
    const xOf = (i) => L + (W - L - R) * (i - lo) / Math.max(hi - lo, 1);
    const yOf = (v) => H - B - (H - T - B) * v / SCALE;

    function drawPhases(g) {
      let start = lo;
      for (let i = lo; i <= hi; i++) {
        if (i < hi && S.phase[i + 1] === S.phase[start]) continue;
        const x0 = xOf(start), x1 = xOf(Math.min(i + 1, hi)), phase = run.names[S.phase[start]];
        g.appendChild(sv("rect", {x: x0, y: T, width: Math.max(x1 - x0, 0.5), height: H - T - B,
                                  fill: PHASE_FILL[phase] || "#f7f7f7"}));
        if (x1 - x0 > 40) {
          const t = sv("text", {x: (x0 + x1) / 2, y: T - 5, "font-size": "10", "text-anchor": "middle", fill: "#555"});
          t.textContent = phase;
          g.appendChild(t);
        }
        start = i + 1;
      }
    }
    function drawAreas(g) {
      const lower = new Array(hi - lo + 1).fill(0);
      run.categories.forEach((c, ci) => {
        const up = [], down = [];
        for (let i = lo; i <= hi; i++) {
          const l = lower[i - lo], u = l + S.bytes[i][ci];
          up.push(xOf(i).toFixed(1) + "," + yOf(u).toFixed(1));
          down.push(xOf(i).toFixed(1) + "," + yOf(l).toFixed(1));
          lower[i - lo] = u;
        }
        g.appendChild(sv("polygon", {points: up.concat(down.reverse()).join(" "), fill: run.colors[ci],
                                     "data-category": c}));
      });
    }
    function drawAxes() {
      const ax = sv("g", {class: "axis", "font-size": "10", fill: "#444"});
      svg.appendChild(ax);
      ax.appendChild(sv("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888"}));
      ax.appendChild(sv("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#888"}));
      for (let j = 0; j <= 4; j++) {
        const v = SCALE * j / 4, y = yOf(v);
        const t = sv("text", {x: L - 4, y: y + 3, "text-anchor": "end"});
        t.textContent = human(v);
        ax.appendChild(t);
        ax.appendChild(sv("line", {x1: L, y1: y, x2: W - R, y2: y, stroke: "#000", "stroke-opacity": "0.07"}));
      }
      const ticks = sv("g", {class: "x-ticks"});
      ax.appendChild(ticks);
      for (let j = 0; j <= 5; j++) {
        const i = Math.round(lo + (hi - lo) * j / 5);
        const t = sv("text", {x: xOf(i), y: H - B + 13, "text-anchor": "middle", class: "x-tick"});
        t.textContent = String(S.index[Math.min(i, n - 1)]);
        ticks.appendChild(t);
      }
      const label = sv("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", fill: "#555"});
      label.textContent = "event (allocation, free or change) in the measured step";
      ax.appendChild(label);
    }
    function draw() {
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      const g = sv("g");
      svg.appendChild(g);
      drawPhases(g);
      drawAreas(g);
      drawAxes();
      if (peakAt >= lo && peakAt <= hi) {
        const px = xOf(peakAt), py = yOf(totals[peakAt]);
        svg.appendChild(sv("circle", {cx: px, cy: py, r: 4, fill: "#000", id: "peak-marker-" + k, class: "peak-marker"}));
        const t = sv("text", {x: Math.min(px + 6, W - R - 110), y: Math.max(py - 6, T + 10), "font-size": "11"});
        t.textContent = "peak " + human(run.peak_bytes);
        svg.appendChild(t);
      }
      cursorLine = sv("line", {y1: T, y2: H - B, stroke: "#000", "stroke-dasharray": "3,3", visibility: "hidden"});
      svg.appendChild(cursorLine);
      placeCursor();
    }
    let cursorLine = null;
    function placeCursor() {
      const inside = cursor >= lo && cursor <= hi;
      cursorLine.setAttribute("visibility", inside ? "visible" : "hidden");
      if (inside) { cursorLine.setAttribute("x1", xOf(cursor)); cursorLine.setAttribute("x2", xOf(cursor)); }
    }
    function describe(i) {
      const parts = [];
      const head = el("div");
      head.appendChild(el("b", {class: "total"}, exact(totals[i])));
      head.appendChild(document.createTextNode(" (" + human(totals[i]) + ")"));
      parts.push(head);
      parts.push(el("div", {}, "event " + S.index[i] + " · " + S.ms[i] + " ms · " + run.names[S.phase[i]]));
      parts.push(el("div", {}, "module: " + (run.names[S.module[i]] || "-")));
      parts.push(el("div", {}, run.names[S.op[i]] || ""));
      run.categories.forEach((c, ci) => {
        if (S.bytes[i][ci]) parts.push(el("div", {}, c + ": " + human(S.bytes[i][ci]) + " (" + exact(S.bytes[i][ci]) + ")"));
      });
      return parts;
    }
    function show(i, clientX) {
      cursor = i;
      placeCursor();
      tip.replaceChildren(...describe(i));
      tip.style.display = "block";
      const r = box.getBoundingClientRect();
      const x = (clientX === undefined ? r.left + xOf(i) * r.width / W : clientX) - r.left;
      tip.style.left = Math.max(0, Math.min(x + 12, r.width - tip.offsetWidth)) + "px";
      tip.style.top = "8px";
      readout.textContent = "event " + S.index[i] + ", " + run.names[S.phase[i]] + ", " +
        (run.names[S.module[i]] || "-") + ": " + exact(totals[i]);
    }
    const hide = () => { tip.style.display = "none"; };
    function svgX(clientX) {
      const r = svg.getBoundingClientRect();
      return (clientX - r.left) * W / r.width;
    }
    // The sample under a pixel: the highest total among those the pixel covers (a memory chart must not hide a peak).
    function pick(clientX) {
      const x = svgX(clientX), per = Math.max(hi - lo, 1) / (W - L - R);
      const a = Math.max(lo, Math.floor(lo + (x - L - 1) * per)), b = Math.min(hi, Math.ceil(lo + (x - L + 1) * per));
      let best = Math.max(lo, Math.min(hi, Math.round(lo + (x - L) * per)));
      for (let i = a; i <= b; i++) if (totals[i] > totals[best]) best = i;
      return best;
    }
    function reset() { lo = 0; hi = n - 1; draw(); }
    function zoom(f) {
      const c = cursor >= 0 ? cursor : Math.round((lo + hi) / 2), span = Math.max(2, Math.round((hi - lo) * f));
      lo = Math.max(0, Math.min(c - Math.round(span / 2), n - 1 - span));
      hi = Math.min(n - 1, lo + span);
      draw();
    }
    let drag = null;
    svg.addEventListener("mousemove", (e) => {
      if (drag !== null) {
        const x = svgX(e.clientX);
        drag.band.setAttribute("x", Math.min(drag.x, x));
        drag.band.setAttribute("width", Math.abs(x - drag.x));
        return;
      }
      show(pick(e.clientX), e.clientX);
    });
    svg.addEventListener("mouseleave", hide);
    svg.addEventListener("mousedown", (e) => {
      e.preventDefault();
      if (e.detail >= 2) { reset(); return; }  // a double click (the dblclick event may not reach a redrawn chart)
      drag = {x: svgX(e.clientX), i: pick(e.clientX),
              band: sv("rect", {y: T, height: H - T - B, x: svgX(e.clientX), width: 0, fill: "#4e79a7",
                                "fill-opacity": "0.2"})};
      svg.appendChild(drag.band);
    });
    window.addEventListener("mouseup", (e) => {
      if (drag === null) return;
      const to = pick(e.clientX), from = drag.i;
      drag.band.remove();
      drag = null;
      if (Math.abs(to - from) >= 2) { lo = Math.min(from, to); hi = Math.max(from, to); draw(); }
    });
    box.addEventListener("keydown", (e) => {
      let i = cursor < 0 ? lo : cursor;
      const step = e.shiftKey ? 10 : 1;
      if (e.key === "ArrowRight") i = Math.min(n - 1, i + step);
      else if (e.key === "ArrowLeft") i = Math.max(0, i - step);
      else if (e.key === "Home") i = lo;
      else if (e.key === "End") i = hi;
      else if (e.key === "p" || e.key === "P") i = peakAt;
      else if (e.key === "+" || e.key === "=") { zoom(0.5); e.preventDefault(); return; }
      else if (e.key === "-") { zoom(2); e.preventDefault(); return; }
      else if (e.key === "0" || e.key === "Escape") { reset(); hide(); e.preventDefault(); return; }
      else return;
      e.preventDefault();
      if (i < lo || i > hi) {
        const span = hi - lo;
        lo = Math.max(0, Math.min(n - 1 - span, i - Math.round(span / 2)));
        hi = lo + span;
      }
      show(i);
    });
    box.addEventListener("blur", hide);
    draw();
    return wrap;
  }

  document.getElementById("note").textContent = DATA.note || "";
  const host = document.getElementById("runs");
  if (DATA.runs.length < 2) host.classList.add("single");
  if (!DATA.runs.length) host.appendChild(el("p", {}, "No run recorded a timeline."));
  DATA.runs.forEach((run, k) => host.appendChild(runSection(run, k)));
})();
