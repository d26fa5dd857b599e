// The dashboard's page: HTML, CSS and JavaScript as strings (no build step, no CDN;
// they ship in dist/ with the rest). uPlot (an npm dependency) draws the line charts;
// the |w| vs |grad| scatter is a plain <canvas> (log-log axes, zeros pinned to the
// axis, the mask's points drawn last and in their own colour: 2000 points need no
// more than that). The page reads the token from its own URL and sends it with every
// request. For tests and scripts it exposes `window.nanotuneDashboard` (the uPlot
// instances, the scatter's counts, the events it received) and data-* attributes.

/** The page, with the token in its asset URLs and the options the script needs. */
export function pageHtml(token: string, config: { policies: readonly string[]; sampleEvery: number }): string {
  const t = encodeURIComponent(token);
  // JSON in a non-executed script element: "<" escaped so no string can close it
  const json = JSON.stringify(config).replace(/</g, "\\u003c");
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>nanotune dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/uplot.css?token=${t}">
<link rel="stylesheet" href="/app.css?token=${t}">
<script type="application/json" id="nt-config">${json}</script>
<script src="/uplot.js?token=${t}"></script>
<script src="/app.js?token=${t}" defer></script>
</head>
<body data-state="connecting">
<header>
  <div class="brand">nanotune <span>dashboard</span></div>
  <div id="status" class="status">
    <span id="st-state" class="pill state-connecting">connecting</span>
    <span id="st-step">step –</span>
    <span id="st-policy">policy –</span>
    <span id="st-speed"></span>
    <span id="st-end"></span>
    <span id="st-conn" class="conn"></span>
  </div>
</header>
<section class="controls">
  <div class="group">
    <button id="pause" type="button" disabled>Pause</button>
    <button id="resume" type="button" disabled>Resume</button>
    <button id="stop" type="button" class="danger" disabled title="finish the step in flight, save a checkpoint, end the run">Stop &amp; save</button>
  </div>
  <div class="group">
    <label>mask policy <select id="policy-type"></select></label>
    <label>density <input id="policy-density" type="number" min="0.0001" max="1" step="0.01" value="0.1"></label>
    <label>refresh every <input id="policy-interval" type="number" min="1" step="1" value="100"> steps</label>
    <button id="policy-apply" type="button" disabled>Switch policy</button>
  </div>
  <div id="action" class="action"></div>
</section>
<main>
  <div class="card wide" id="card-loss"><h2>loss <small>train · <span class="evalkey">eval</span></small></h2><div class="chart" id="chart-loss"></div></div>
  <div class="card tall" id="card-scatter">
    <h2>|w| vs |grad| <small id="scatter-title"></small></h2>
    <label class="tensor">tensor <select id="tensor"></select></label>
    <div class="plot"><canvas id="scatter" data-points="0" data-in-mask="0"></canvas></div>
    <div class="legend"><span class="dot in"></span> in the mask (<span id="n-in">0</span>) <span class="dot out"></span> not (<span id="n-out">0</span>) <span id="n-zero"></span></div>
  </div>
  <div class="card" id="card-gradnorm"><h2>gradient norm</h2><div class="chart" id="chart-gradnorm"></div></div>
  <div class="card" id="card-tokens"><h2>tokens / s</h2><div class="chart" id="chart-tokens"></div></div>
  <div class="card" id="card-lr"><h2>learning rate</h2><div class="chart" id="chart-lr"></div></div>
  <div class="card" id="card-density"><h2>density k</h2><div class="chart" id="chart-density"></div></div>
  <div class="card" id="card-events"><h2>events <small><span class="key swap"></span>policy swap <span class="key refresh"></span>mask refresh</small></h2><ol id="events"></ol></div>
</main>
</body>
</html>
`;
}

export const APP_CSS = String.raw`
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --muted: #6b7280; --line: #e3e6eb; --accent: #2563eb;
  --swap: #c026d3; --refresh: rgba(100, 116, 139, 0.35); --in: #ea580c; --out: #2563eb; --eval: #16a34a; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--bg); }
header { display: flex; align-items: center; gap: 24px; padding: 10px 18px; background: #111827; color: #f9fafb; flex-wrap: wrap; }
.brand { font-weight: 700; font-size: 17px; letter-spacing: .2px; }
.brand span { font-weight: 400; color: #9ca3af; }
.status { display: flex; gap: 18px; align-items: center; flex-wrap: wrap; font-variant-numeric: tabular-nums; }
.pill { padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .5px; background: #374151; }
.state-running { background: #16a34a; } .state-paused, .state-pausing { background: #d97706; } .state-ended { background: #6b7280; }
.state-waiting, .state-connecting { background: #374151; } .state-failed { background: #dc2626; }
.conn { color: #9ca3af; font-size: 12px; }
#st-end { color: #fbbf24; }
.controls { display: flex; gap: 22px; align-items: center; flex-wrap: wrap; padding: 10px 18px; background: var(--card); border-bottom: 1px solid var(--line); }
.group { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
label { color: var(--muted); display: inline-flex; gap: 6px; align-items: center; }
input, select, button { font: inherit; }
input[type=number] { width: 86px; padding: 4px 6px; border: 1px solid #cbd2dc; border-radius: 6px; }
select { padding: 4px 6px; border: 1px solid #cbd2dc; border-radius: 6px; background: #fff; max-width: 320px; }
button { padding: 5px 14px; border-radius: 6px; border: 1px solid #cbd2dc; background: #f9fafb; cursor: pointer; }
button:hover:not(:disabled) { background: #eef2ff; border-color: var(--accent); }
button:disabled { opacity: .45; cursor: default; }
button.danger { color: #b91c1c; border-color: #fca5a5; }
.action { color: var(--muted); font-size: 13px; }
.action.error { color: #b91c1c; } .action.ok { color: #15803d; }
main { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 12px; padding: 12px 18px 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px 6px; min-width: 0; }
.card.wide { grid-column: span 2; }
.card.tall { grid-row: span 2; display: flex; flex-direction: column; }
h2 { font-size: 13px; margin: 0 0 4px; font-weight: 600; color: #374151; }
h2 small { font-weight: 400; color: var(--muted); margin-left: 6px; }
.evalkey { color: var(--eval); font-weight: 600; }
.chart { width: 100%; min-height: 150px; }
.tensor { font-size: 13px; margin-bottom: 4px; }
.tensor select { max-width: 100%; flex: 1; }
.plot { position: relative; flex: 1; min-height: 320px; }
#scatter { position: absolute; inset: 0; width: 100%; height: 100%; display: block; }
.legend { font-size: 12px; color: var(--muted); padding: 4px 0 2px; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin: 0 2px 0 8px; vertical-align: middle; }
.dot.in { background: var(--in); } .dot.out { background: var(--out); opacity: .6; }
.key { display: inline-block; width: 14px; height: 0; border-top: 2px solid; margin: 0 4px 3px 10px; vertical-align: middle; }
.key.swap { border-color: var(--swap); } .key.refresh { border-color: var(--refresh); border-top-style: dashed; }
#events { list-style: none; margin: 0; padding: 0; max-height: 190px; overflow: auto; font-size: 12.5px; font-variant-numeric: tabular-nums; }
#events li { padding: 2px 0; border-bottom: 1px solid #f1f3f6; }
#events li b { display: inline-block; min-width: 64px; color: var(--muted); font-weight: 500; }
#events li.t-policy-swapped { color: var(--swap); } #events li.t-run-end { font-weight: 600; }
#events li.t-run-paused, #events li.t-run-resumed { color: #b45309; } #events li.t-eval { color: var(--eval); }
#events li.t-sink-error, #events li.t-error { color: #b91c1c; }
.u-legend { font-size: 12px; } .u-legend .u-marker { width: 10px; height: 10px; }
.u-title { display: none; }
@media (max-width: 1100px) { main { grid-template-columns: repeat(2, minmax(0, 1fr)); } .card.tall { grid-row: span 1; } }
`;

// Plain ES2017, no backticks or template placeholders (this is a TypeScript template string).
export const APP_JS = String.raw`
(function () {
  "use strict";
  var TOKEN = new URLSearchParams(location.search).get("token") || "";
  var CONFIG = JSON.parse(document.getElementById("nt-config").textContent);
  var MAX_POINTS = 20000;
  var $ = function (id) { return document.getElementById(id); };
  var q = function (path) { return path + (path.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(TOKEN); };

  // ---- state ------------------------------------------------------------------
  var S = {
    phase: "connecting", // waiting | running | pausing | paused | ended
    step: null, total: null, policy: null, spec: null, tokensPerS: null, end: null,
    xs: [], loss: [], evalLoss: [], lr: [], density: [], gradNorm: [], tokens: [],
    marks: [], // {x, kind: "refresh" | "swap", label}
    events: [], // every TrainerEvent received (for tests; train:step and mask:refreshed counted only)
    counts: {}, lastRefresh: null, sample: null, tensor: null
  };
  var num = function (v) {
    if (typeof v === "number") return isFinite(v) ? v : null;
    return null; // "NaN", "Infinity" (non-finite values travel as strings), null
  };
  var fmt = function (v) {
    if (v == null || !isFinite(v)) return "–";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return String(+v.toPrecision(4));
  };
  var densityText = function (spec) {
    if (!spec) return "";
    var d = spec.density;
    return typeof d === "number" ? "k " + d : d && d.type ? "k " + d.type + " schedule" : "";
  };

  // ---- charts (uPlot) -------------------------------------------------------------
  function marksPlugin() {
    return { hooks: { draw: [function (u) {
      var ctx = u.ctx, b = u.bbox, min = u.scales.x.min, max = u.scales.x.max;
      if (min == null || max == null) return;
      var dpr = window.devicePixelRatio || 1;
      var lastPx = -1e9;
      ctx.save();
      ctx.beginPath(); ctx.rect(b.left, b.top, b.width, b.height); ctx.clip();
      for (var i = 0; i < S.marks.length; i++) {
        var m = S.marks[i];
        if (m.x < min || m.x > max) continue;
        var px = Math.round(u.valToPos(m.x, "x", true)) + 0.5;
        if (m.kind === "refresh") {
          if (px - lastPx < 4 * dpr) continue; // too dense to tell apart
          lastPx = px;
          ctx.strokeStyle = "rgba(100,116,139,0.35)"; ctx.lineWidth = 1 * dpr; ctx.setLineDash([3 * dpr, 3 * dpr]);
        } else {
          ctx.strokeStyle = "#c026d3"; ctx.lineWidth = 2 * dpr; ctx.setLineDash([]);
        }
        ctx.beginPath(); ctx.moveTo(px, b.top); ctx.lineTo(px, b.top + b.height); ctx.stroke();
        if (m.kind === "swap") {
          ctx.fillStyle = "#c026d3"; ctx.font = (11 * dpr) + "px system-ui, sans-serif"; ctx.textBaseline = "top";
          ctx.fillText(m.label, px + 4 * dpr, b.top + 3 * dpr);
        }
      }
      ctx.restore();
    }] } };
  }
  var CHARTS = {};
  var chartDefs = [
    { key: "loss", el: "chart-loss", series: [
      { label: "train loss", stroke: "#2563eb", width: 1.5, value: function (u, v) { return fmt(v); } },
      { label: "eval loss", stroke: "#16a34a", width: 2, spanGaps: true, points: { show: true, size: 7, fill: "#16a34a" }, value: function (u, v) { return fmt(v); } }
    ], data: function () { return [S.xs, S.loss, S.evalLoss]; } },
    { key: "gradNorm", el: "chart-gradnorm", series: [{ label: "grad norm", stroke: "#7c3aed", width: 1.5, value: function (u, v) { return fmt(v); } }], data: function () { return [S.xs, S.gradNorm]; } },
    { key: "tokens", el: "chart-tokens", series: [{ label: "tokens/s", stroke: "#0891b2", width: 1.5, value: function (u, v) { return fmt(v); } }], data: function () { return [S.xs, S.tokens]; } },
    { key: "lr", el: "chart-lr", series: [{ label: "lr", stroke: "#db2777", width: 1.5, value: function (u, v) { return fmt(v); } }], data: function () { return [S.xs, S.lr]; } },
    { key: "density", el: "chart-density", series: [{ label: "density", stroke: "#ea580c", width: 1.5, value: function (u, v) { return fmt(v); } }], data: function () { return [S.xs, S.density]; } }
  ];
  function chartSize(el) {
    var w = Math.max(200, el.clientWidth);
    return { width: w, height: el.id === "chart-loss" ? 250 : 170 };
  }
  function makeCharts() {
    chartDefs.forEach(function (d) {
      var el = $(d.el);
      var size = chartSize(el);
      var opts = {
        width: size.width, height: size.height,
        scales: { x: { time: false } },
        axes: [
          { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6eb" } },
          { stroke: "#6b7280", size: 58, grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6eb" },
            values: function (u, vals) { return vals.map(fmt); } }
        ],
        series: [{ label: "step", value: function (u, v) { return v == null ? "–" : String(v); } }].concat(d.series),
        cursor: { drag: { x: true, y: false } },
        legend: { live: true },
        plugins: [marksPlugin()]
      };
      CHARTS[d.key] = new uPlot(opts, d.data(), el);
    });
    var ro = new ResizeObserver(function () {
      chartDefs.forEach(function (d) { CHARTS[d.key].setSize(chartSize($(d.el))); });
      drawScatter();
    });
    ro.observe(document.querySelector("main"));
  }
  var drawTimer = null;
  function scheduleDraw() {
    if (drawTimer) return;
    drawTimer = setTimeout(function () {
      drawTimer = null;
      chartDefs.forEach(function (d) {
        CHARTS[d.key].setData(d.data());
        $(d.el).setAttribute("data-points", String(S.xs.length));
      });
      renderStatus();
    }, 120);
  }
  function thin() { // bounded memory: past MAX_POINTS keep every other step (and every eval point)
    var keep = function (arr) { return arr.filter(function (_, i) { return i % 2 === 0 || S.evalLoss[i] != null; }); };
    var cols = ["xs", "loss", "lr", "density", "gradNorm", "tokens", "evalLoss"];
    var next = {};
    cols.forEach(function (c) { next[c] = keep(S[c]); });
    cols.forEach(function (c) { S[c] = next[c]; });
  }

  // ---- events -----------------------------------------------------------------
  function logEvent(step, type, html) {
    var li = document.createElement("li");
    li.className = "t-" + type.replace(":", "-");
    li.setAttribute("data-type", type);
    var b = document.createElement("b");
    b.textContent = step == null ? "" : "step " + step;
    li.appendChild(b);
    li.appendChild(document.createTextNode(" " + html));
    var ol = $("events");
    ol.insertBefore(li, ol.firstChild);
    while (ol.childNodes.length > 300) ol.removeChild(ol.lastChild);
  }
  function onEvent(ev) {
    S.counts[ev.type] = (S.counts[ev.type] || 0) + 1;
    if (ev.type !== "train:step" && ev.type !== "mask:refreshed") S.events.push(ev);
    switch (ev.type) {
      case "run:start":
        S.total = ev.totalSteps; S.step = ev.step; S.end = null;
        if (ev.policy) { S.policy = ev.policy.name; S.spec = ev.policy.spec; fillPolicyForm(ev.policy.spec); }
        if (S.phase !== "paused" && S.phase !== "pausing") S.phase = "running";
        logEvent(ev.step, ev.type, "run started: " + ev.model.path + " (" + Number(ev.model.parameters).toLocaleString("en-US") + " params, " + ev.model.device + "), " + ev.totalSteps + " steps" + (ev.policy ? ", policy " + ev.policy.name : ""));
        break;
      case "train:step":
        S.xs.push(ev.step); S.loss.push(num(ev.loss)); S.evalLoss.push(null); S.lr.push(num(ev.lr));
        S.density.push(num(ev.density)); S.gradNorm.push(num(ev.gradNorm)); S.tokens.push(num(ev.tokensPerS));
        if (S.xs.length > MAX_POINTS) thin();
        S.step = ev.step + 1; S.tokensPerS = num(ev.tokensPerS);
        if (ev.policy) S.policy = ev.policy;
        break;
      case "mask:refreshed":
        S.marks.push({ x: ev.step, kind: "refresh" });
        var prev = S.lastRefresh;
        if (!prev || prev.policy !== ev.policy || prev.decision.density !== ev.decision.density) {
          logEvent(ev.step, ev.type, "mask refreshed by " + ev.policy + " (" + ev.decision.criterion + ", k " + fmt(ev.decision.density) + ")");
        }
        S.lastRefresh = ev;
        break;
      case "policy:swapped":
        S.marks.push({ x: ev.step, kind: "swap", label: ev.to });
        S.policy = ev.to; S.spec = ev.spec; fillPolicyForm(ev.spec);
        logEvent(ev.step, ev.type, "policy swapped: " + (ev.from || "–") + " → " + ev.to + " (" + densityText(ev.spec) + ")");
        break;
      case "eval":
        if (S.xs.length) S.evalLoss[S.xs.length - 1] = num(ev.loss);
        logEvent(ev.step, ev.type, "eval loss " + fmt(num(ev.loss)) + ", perplexity " + fmt(num(ev.perplexity)));
        break;
      case "checkpoint:saved":
        logEvent(ev.step, ev.type, "checkpoint saved: " + ev.path);
        break;
      case "step:skipped":
        logEvent(ev.step, ev.type, "step skipped: non-finite loss or gradient (" + ev.inARow + " in a row)");
        break;
      case "sink:error":
        logEvent(ev.step, ev.type, "sink " + ev.sink + " failed: " + ev.message);
        break;
      case "run:paused":
        S.phase = "paused";
        logEvent(ev.step, ev.type, "paused");
        break;
      case "run:resumed":
        S.phase = "running";
        logEvent(ev.step, ev.type, "resumed");
        break;
      case "run:end":
        S.phase = "ended"; S.end = ev; S.step = ev.step;
        logEvent(ev.step, ev.type, "run ended: " + ev.reason + (ev.checkpoint ? ", checkpoint " + ev.checkpoint : "") + (ev.error ? ": " + ev.error.message : ""));
        if (es) es.close(); // the server closes after run:end; the page keeps what it has
        break;
    }
    // the request's note ("pause requested ...") gives way to the event it asked for
    if (/^(run:paused|run:resumed|policy:swapped|run:end)$/.test(ev.type) && $("action").className === "action ok") say("", "");
    scheduleDraw();
  }

  // ---- status line --------------------------------------------------------------
  function renderStatus() {
    var phase = S.phase;
    if (phase === "ended" && S.end && S.end.reason === "failed") phase = "failed";
    document.body.setAttribute("data-state", S.phase);
    var st = $("st-state");
    st.textContent = phase === "ended" ? "run ended" : phase;
    st.className = "pill state-" + phase;
    $("st-step").textContent = "step " + (S.step == null ? "–" : S.step) + (S.total == null ? "" : " / " + S.total);
    $("st-policy").textContent = "policy " + (S.policy || "–") + (S.spec ? " (" + densityText(S.spec) + (S.spec.maskInterval ? ", every " + S.spec.maskInterval : "") + ")" : "");
    $("st-speed").textContent = S.tokensPerS == null || S.phase !== "running" ? "" : fmt(S.tokensPerS) + " tokens/s";
    $("st-end").textContent = S.end ? "reason: " + S.end.reason + (S.end.checkpoint ? " · checkpoint saved" : "") : "";
    var live = S.phase === "running" || S.phase === "paused" || S.phase === "pausing";
    $("pause").disabled = !(S.phase === "running");
    $("resume").disabled = !(S.phase === "paused" || S.phase === "pausing");
    $("stop").disabled = !live;
    $("policy-apply").disabled = !live || !S.policy;
  }

  // ---- controls -----------------------------------------------------------------
  function fillPolicyForm(spec) {
    if (!spec || spec.type === "custom") return;
    $("policy-type").value = spec.type;
    if (typeof spec.density === "number") $("policy-density").value = String(spec.density);
    if (spec.maskInterval) $("policy-interval").value = String(spec.maskInterval);
  }
  function say(text, kind) {
    var a = $("action"); a.textContent = text; a.className = "action " + (kind || "");
  }
  function post(path, body) {
    return fetch(q(path), { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) })
      .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, status: r.status, body: j }; }); })
      .catch(function (e) { return { ok: false, status: 0, body: { error: String(e) } }; });
  }
  function control(path, body, done) {
    return post(path, body).then(function (r) {
      if (!r.ok) say(r.body.error || ("HTTP " + r.status), "error");
      else say(done(r.body), "ok");
      window.nanotuneDashboard.lastResponse = r;
      return r;
    });
  }
  function setupControls() {
    var sel = $("policy-type");
    CONFIG.policies.forEach(function (p) {
      var o = document.createElement("option"); o.value = p; o.textContent = p; sel.appendChild(o);
    });
    $("pause").onclick = function () {
      S.phase = "pausing"; renderStatus();
      control("/api/pause", {}, function () { return "pause requested: the step in flight finishes first"; });
    };
    $("resume").onclick = function () {
      control("/api/resume", {}, function () { return "resume requested"; });
    };
    $("stop").onclick = function () {
      if (!window.confirm("Stop the run? The step in flight finishes and a checkpoint is saved.")) return;
      control("/api/stop", {}, function () { return "stop requested: finishing the step and saving a checkpoint"; });
    };
    $("policy-apply").onclick = function () {
      var spec = { type: sel.value, density: Number($("policy-density").value), maskInterval: Number($("policy-interval").value) };
      control("/api/policy", spec, function () { return "policy " + spec.type + " (k " + spec.density + ") requested: the next step refreshes the mask with it"; });
    };
    $("tensor").onchange = function () {
      var name = $("tensor").value;
      S.tensor = name;
      fetch(q("/api/sample?tensor=" + encodeURIComponent(name))).then(function (r) {
        return r.json().then(function (j) { if (r.ok) setSample(j); else say(j.error || ("HTTP " + r.status), "error"); });
      });
    };
  }

  // ---- scatter (plain canvas, log-log) ----------------------------------------
  function fillTensors(list) {
    var sel = $("tensor");
    var key = list.map(function (t) { return t.name; }).join("|");
    if (sel.getAttribute("data-key") === key) return;
    sel.setAttribute("data-key", key);
    sel.innerHTML = "";
    list.forEach(function (t) {
      var o = document.createElement("option");
      o.value = t.name; o.textContent = t.name + " [" + t.shape.join("×") + "]" + (t.masked ? "" : " (dense)");
      sel.appendChild(o);
    });
  }
  function setSample(s) {
    if (S.tensor && s.tensor !== S.tensor) return; // another page's choice
    S.sample = s; S.tensor = s.tensor;
    fillTensors(s.tensors);
    $("tensor").value = s.tensor;
    drawScatter();
  }
  function drawScatter() {
    var c = $("scatter"), s = S.sample;
    var dpr = window.devicePixelRatio || 1;
    var W = c.clientWidth, H = c.clientHeight;
    if (!W || !H) return;
    c.width = Math.round(W * dpr); c.height = Math.round(H * dpr);
    var ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.font = "12px system-ui, sans-serif"; ctx.fillStyle = "#6b7280";
    if (!s) { ctx.fillText("waiting for a weight sample…", 12, 24); return; }
    $("scatter-title").textContent = s.tensor + " @ step " + (s.step == null ? "–" : s.step);
    if (!s.g) {
      ctx.fillText("no gradients yet: the scatter appears after the first step", 12, 24);
      c.setAttribute("data-points", "0"); c.setAttribute("data-in-mask", "0");
      return;
    }
    var n = s.w.length, lw = [], lg = [], i;
    var minW = Infinity, maxW = -Infinity, minG = Infinity, maxG = -Infinity, zeros = 0;
    for (i = 0; i < n; i++) {
      var w = s.w[i], g = s.g[i];
      if (w > 0 && isFinite(w)) { minW = Math.min(minW, w); maxW = Math.max(maxW, w); }
      if (g > 0 && isFinite(g)) { minG = Math.min(minG, g); maxG = Math.max(maxG, g); }
    }
    if (!isFinite(minW)) { minW = 1e-8; maxW = 1; }
    if (!isFinite(minG)) { minG = 1e-8; maxG = 1; }
    var x0 = Math.floor(Math.log10(minW)), x1 = Math.ceil(Math.log10(maxW));
    var y0 = Math.floor(Math.log10(minG)), y1 = Math.ceil(Math.log10(maxG));
    if (x1 === x0) x1++; if (y1 === y0) y1++;
    var L = 52, R = 12, T = 10, B = 36, pw = W - L - R, ph = H - T - B;
    var X = function (lv) { return L + (lv - x0) / (x1 - x0) * pw; };
    var Y = function (lv) { return T + ph - (lv - y0) / (y1 - y0) * ph; };
    // axes: decades
    ctx.strokeStyle = "#eef0f3"; ctx.lineWidth = 1; ctx.fillStyle = "#6b7280"; ctx.textAlign = "center"; ctx.textBaseline = "top";
    var step = function (a, b) { return Math.max(1, Math.ceil((b - a) / 7)); };
    var d;
    for (d = x0; d <= x1; d += step(x0, x1)) { ctx.beginPath(); ctx.moveTo(X(d), T); ctx.lineTo(X(d), T + ph); ctx.stroke(); ctx.fillText("1e" + d, X(d), T + ph + 4); }
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (d = y0; d <= y1; d += step(y0, y1)) { ctx.beginPath(); ctx.moveTo(L, Y(d)); ctx.lineTo(L + pw, Y(d)); ctx.stroke(); ctx.fillText("1e" + d, L - 4, Y(d)); }
    ctx.strokeStyle = "#9ca3af"; ctx.strokeRect(L, T, pw, ph);
    ctx.fillStyle = "#374151"; ctx.textAlign = "center"; ctx.textBaseline = "bottom";
    ctx.fillText("|w|", L + pw / 2, H - 2);
    ctx.save(); ctx.translate(12, T + ph / 2); ctx.rotate(-Math.PI / 2); ctx.textBaseline = "middle"; ctx.fillText("|grad|", 0, 0); ctx.restore();
    // points: out of the mask first, then the mask on top; zeros pinned to the axis
    var inMask = 0, out = 0;
    var lx = function (v) { return v > 0 && isFinite(v) ? Math.log10(v) : x0; };
    var ly = function (v) { return v > 0 && isFinite(v) ? Math.log10(v) : y0; };
    for (var pass = 0; pass < 2; pass++) {
      ctx.fillStyle = pass === 0 ? "rgba(37,99,235,0.45)" : "rgba(234,88,12,0.85)";
      for (i = 0; i < n; i++) {
        var m = s.m ? s.m[i] === 1 : false;
        if (m !== (pass === 1)) continue;
        if (!(s.w[i] > 0) || !(s.g[i] > 0)) zeros++;
        if (m) inMask++; else out++;
        ctx.fillRect(X(lx(s.w[i])) - 1.5, Y(ly(s.g[i])) - 1.5, 3, 3);
      }
    }
    c.setAttribute("data-points", String(n)); c.setAttribute("data-in-mask", String(inMask)); c.setAttribute("data-tensor", s.tensor);
    c.setAttribute("data-step", s.step == null ? "" : String(s.step));
    $("n-in").textContent = String(inMask); $("n-out").textContent = String(out);
    $("n-zero").textContent = zeros ? " · " + zeros + " with a zero (on the axis)" : "";
  }

  // ---- the stream -------------------------------------------------------------------
  var es = null;
  function connect() {
    es = new EventSource(q("/events"));
    es.onopen = function () { $("st-conn").textContent = "live"; };
    es.onerror = function () { if (S.phase !== "ended") $("st-conn").textContent = "reconnecting…"; };
    es.onmessage = function (m) { onEvent(JSON.parse(m.data)); };
    es.addEventListener("state", function (m) {
      var st = JSON.parse(m.data);
      if (st.ended) S.phase = "ended";
      else if (!st.started) S.phase = "waiting";
      else if (st.paused && S.phase !== "paused") S.phase = "pausing";
      else if (!st.paused && (S.phase === "waiting" || S.phase === "connecting")) S.phase = "running";
      if (st.totalSteps != null) S.total = st.totalSteps;
      renderStatus();
    });
    es.addEventListener("sample", function (m) { setSample(JSON.parse(m.data)); });
    es.addEventListener("sample-error", function (m) { say("weight sample: " + JSON.parse(m.data).message, "error"); });
  }

  window.nanotuneDashboard = {
    charts: CHARTS, state: S, lastResponse: null,
    points: function () { return S.xs.length; },
    scatter: function () { var c = $("scatter"); return { points: +c.getAttribute("data-points"), inMask: +c.getAttribute("data-in-mask"), tensor: S.sample ? S.sample.tensor : null, step: S.sample ? S.sample.step : null }; }
  };
  setupControls();
  makeCharts();
  renderStatus();
  drawScatter();
  connect();
})();
`;
