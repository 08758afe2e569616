// capsule-actors Stats view: draws api/stats as SVG (no library, no build step) and redraws it
// every 5 s. Authentication is the board's HttpOnly cookie.
"use strict";
(function () {
  const OUTCOMES = { SUCCEEDED: "#1a7f37", FAILED: "#cf222e", CANCELLED: "#8c959f" };
  const PALETTE = ["#0969da", "#bf3989", "#9a6700", "#1a7f37", "#8250df", "#cf222e", "#0a3069", "#57606a"];
  const W = 640, H = 200, L = 44, R = 8, T = 8, B = 22;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (sel) => document.querySelector(sel);
  let windowName = "hour";

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    return node;
  }
  function fmt(v) {
    if (v === 0) return "0";
    if (v >= 100) return v.toFixed(0);
    if (v >= 1) return v.toFixed(1);
    return v.toPrecision(2);
  }
  function seconds(s) { return s < 1 ? (s * 1000).toFixed(s < 0.01 ? 2 : 0) + " ms" : s.toFixed(2) + " s"; }
  function clock(ts) { return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); }

  // axes with the y scale's top and the time of the first, middle and last bucket
  function frame(svg, top, buckets, unit) {
    svg.replaceChildren();
    svg.append(el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    svg.append(el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
    svg.append(el("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(top)));
    svg.append(el("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    if (unit) svg.append(el("text", { x: L + 4, y: T + 8 }, unit));
    if (buckets) {
      for (const i of [0, Math.floor(buckets.length / 2), buckets.length - 1]) {
        const x = L + (W - L - R) * i / Math.max(1, buckets.length - 1);
        svg.append(el("text", { x: x, y: H - 6, "text-anchor": "middle" }, clock(buckets[i])));
      }
    }
  }
  function legend(section, entries) {
    const box = section.querySelector(".legend");
    box.replaceChildren(...entries.map(([label, color]) => {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = color;
      item.append(swatch, document.createTextNode(label));
      return item;
    }));
  }
  function lines(id, buckets, series, colors, unit, least) {
    const section = $(id), svg = section.querySelector("svg");
    const top = Math.max(least, ...Object.values(series).flat()) * 1.1;
    frame(svg, top, buckets, unit);
    const xs = (i) => L + (W - L - R) * i / Math.max(1, buckets.length - 1);
    const ys = (v) => H - B - (H - B - T) * v / top;
    Object.entries(series).forEach(([name, values]) => {
      const points = values.map((v, i) => xs(i).toFixed(1) + "," + ys(v).toFixed(1)).join(" ");
      svg.append(el("polyline", { points: points, stroke: colors[name], "data-series": name,
                                  "data-total": values.reduce((a, b) => a + b, 0) }));
    });
    legend(section, Object.keys(series).map((name) => [name, colors[name]]));
  }
  function bars(id, rows) {  // run time p50 / p99 per task name: two bars each
    const section = $(id), svg = section.querySelector("svg");
    const top = Math.max(1e-9, ...rows.map((r) => r.p99)) * 1.1;
    frame(svg, top, null, "seconds");
    const slot = Math.min(120, (W - L - R) / Math.max(1, rows.length));
    rows.forEach((r, i) => {
      [["p50", "#54aeff"], ["p99", "#0969da"]].forEach(([q, color], j) => {
        const h = (H - B - T) * r[q] / top, x = L + slot * i + 4 + j * (slot - 8) / 2;
        const bar = el("rect", { x: x.toFixed(1), y: (H - B - h).toFixed(1), width: ((slot - 8) / 2 - 2).toFixed(1),
                                 height: h.toFixed(1), fill: color, "data-task": r.name, "data-q": q,
                                 "data-seconds": r[q] });
        bar.append(el("title", {}, `${r.name} ${q} ${seconds(r[q])} (${r.n} tasks)`));
        svg.append(bar);
      });
      svg.append(el("text", { x: (L + slot * i + slot / 2).toFixed(1), y: H - 6, "text-anchor": "middle" },
                    r.name.length > 18 ? r.name.slice(0, 17) + "…" : r.name));
    });
    legend(section, [["p50", "#54aeff"], ["p99", "#0969da"]]);
  }
  // actor restarts and crashed attempts per bucket: two bars side by side
  function restarts(id, buckets, series) {
    const section = $(id), svg = section.querySelector("svg");
    const top = Math.max(1, ...Object.values(series).map((s) => s.values).flat()) * 1.1;
    frame(svg, top, buckets, "per bucket");
    const w = (W - L - R) / buckets.length;
    Object.entries(series).forEach(([name, s], j) => {
      s.values.forEach((n, i) => {
        if (!n) return;
        const h = (H - B - T) * n / top;
        svg.append(el("rect", { x: (L + w * i + j * w / 2).toFixed(1), y: (H - B - h).toFixed(1),
                                width: Math.max(1, w / 2 - 0.5).toFixed(1), height: h.toFixed(1), fill: s.color,
                                "data-series": name, "data-count": n }));
      });
      svg.dataset[name] = s.values.reduce((a, b) => a + b, 0);
    });
    legend(section, Object.entries(series).map(([name, s]) => [s.label, s.color]));
  }

  async function refresh() {
    let data;
    try {
      const resp = await fetch("api/stats?window=" + windowName, { credentials: "same-origin", cache: "no-store" });
      if (!resp.ok) throw new Error((await resp.json().catch(() => ({}))).error || resp.statusText);
      data = await resp.json();
    } catch (err) {
      const banner = $("#banner");
      banner.hidden = false;
      banner.textContent = "cannot read the stats: " + err.message;
      return;
    }
    $("#banner").hidden = true;
    lines("#chart-throughput", data.buckets, data.throughput, OUTCOMES, "tasks/s", 0.01);
    const names = Object.keys(data.queue);
    lines("#chart-queue", data.buckets, data.queue,
          Object.fromEntries(names.map((n, i) => [n, PALETTE[i % PALETTE.length]])), "tasks", 1);
    bars("#chart-runtime", data.run_time);
    restarts("#chart-restarts", data.buckets, {
      restarts: { values: data.restarts, color: "#cf222e", label: "actor restarts (died unasked)" },
      crashes: { values: data.crashes, color: "#ff8182", label: "attempts crashed with them" },
    });
    $("#updated").textContent = "updated " + new Date(data.now * 1000).toLocaleTimeString();
    document.body.dataset.loaded = String(Date.now());
  }

  document.querySelectorAll("#windows button").forEach((button) => {
    button.addEventListener("click", () => {
      windowName = button.dataset.window;
      document.querySelectorAll("#windows button").forEach((b) => b.classList.toggle("on", b === button));
      refresh();
    });
  });
  refresh();
  setInterval(refresh, 5000);
})();
