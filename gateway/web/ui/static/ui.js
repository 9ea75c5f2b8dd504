// spangate dashboard: local times, charts, copy buttons and live updates from the span stream.
// Plain script, no build step; htmx and uPlot are vendored beside it.
"use strict";

(function () {
  // Times arrive in UTC; people read them in their own time zone.
  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      if (el.dataset.local) return;
      var d = new Date(el.getAttribute("datetime"));
      if (isNaN(d)) return;
      el.title = el.getAttribute("datetime");
      el.textContent = d.toLocaleString();
      el.dataset.local = "1";
    });
  }

  var charts = [];
  function drawCharts(root) {
    var data = root.querySelector("#series");
    if (!data || typeof uPlot === "undefined") return;
    var s = JSON.parse(data.textContent);
    charts.forEach(function (c) { c.destroy(); });
    charts = [];
    var defs = {
      calls: [["calls", s.calls, "#4f7be8"], ["errors", s.errors, "#d92d20"]],
      latency: [["p50 ms", s.p50_ms, "#4f7be8"], ["p95 ms", s.p95_ms, "#c4780a"]],
      tokens: [["tokens", s.tokens, "#12a383"]],
      cost: [["USD", s.cost_usd, "#7a5af8"]],
    };
    root.querySelectorAll("[data-chart]").forEach(function (el) {
      var series = defs[el.dataset.chart];
      if (!series) return;
      el.textContent = "";
      var opts = {
        width: Math.max(el.clientWidth, 280), height: 150,
        legend: { show: true }, cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true } },
        series: [{}].concat(series.map(function (d) {
          return { label: d[0], stroke: d[2], width: 1.5, spanGaps: true };
        })),
        axes: [{}, { size: 50 }],
      };
      charts.push(new uPlot(opts, [s.t].concat(series.map(function (d) { return d[1]; })), el));
    });
  }

  function wireCopy(root) {
    root.querySelectorAll("button[data-copy]").forEach(function (btn) {
      if (btn.dataset.wired) return;
      btn.dataset.wired = "1";
      btn.addEventListener("click", function () {
        var target = document.querySelector(btn.dataset.copy);
        if (!target) return;
        var done = function () { btn.textContent = "copied"; };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(target.textContent).then(done);
        } else {
          var range = document.createRange();
          range.selectNodeContents(target);
          var sel = window.getSelection();
          sel.removeAllRanges();
          sel.addRange(range);
          document.execCommand("copy");
          done();
        }
      });
    });
  }

  function refresh(root) {
    localizeTimes(root);
    drawCharts(root);
    wireCopy(root);
  }

  // One EventSource per page. A span event re-fetches the page and swaps in only the live
  // region; refreshes are coalesced so a burst of calls costs one or two renders.
  var sources = {};
  function subscribe(url, onSpan) {
    var es = sources[url];
    if (!es) {
      es = new EventSource(url);
      es.listeners = [];
      es.addEventListener("span", function (ev) {
        var span = JSON.parse(ev.data);
        es.listeners.forEach(function (fn) { fn(span); });
      });
      var setDot = function (on) {
        document.querySelectorAll("[data-live-dot]").forEach(function (d) { d.classList.toggle("on", on); });
      };
      es.addEventListener("open", function () { setDot(true); });
      es.addEventListener("error", function () { setDot(false); });
      sources[url] = es;
    }
    es.listeners.push(onSpan);
  }

  function liveRegion(el) {
    var selector = el.dataset.liveRefresh;
    var wait = parseInt(el.dataset.debounce || "300", 10);
    var timer = null, busy = false, again = false;
    var run = function () {
      timer = null;
      if (busy) { again = true; return; }
      busy = true;
      htmx.ajax("GET", window.location.href, { target: selector, select: selector, swap: "outerHTML" })
        .finally(function () {
          busy = false;
          if (again) { again = false; schedule(); }
        });
    };
    var schedule = function () { if (!timer) timer = setTimeout(run, wait); };
    var known = function (span) {
      // The rollouts list only changes when a call names a rollout not on the page.
      if (!("newRollouts" in el.dataset)) return false;
      var current = document.querySelector(selector);
      if (!span.rollout_id || !current) return true;
      return !!current.querySelector('[data-rollout-id="' + CSS.escape(span.rollout_id) + '"]');
    };
    subscribe(el.dataset.stream, function (span) { if (!known(span)) schedule(); });
  }

  function fmtMs(v) { return v == null ? "–" : v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(1) + " ms"; }

  function liveTail(table) {
    var body = table.querySelector("tbody");
    var agent = table.dataset.agent;
    var keep = parseInt(table.dataset.keep || "500", 10);
    subscribe(table.dataset.tail, function (span) {
      var attrs = span.attributes || {};
      if (agent && attrs["gen_ai.agent.id"] !== agent) return;
      var tr = document.createElement("tr");
      tr.dataset.spanId = span.span_id;
      if (span.status === "error") tr.className = "error";
      var cell = function (text, cls) {
        var td = document.createElement("td");
        if (cls) td.className = cls;
        td.textContent = text;
        tr.appendChild(td);
        return td;
      };
      var link = function (td, href, text) {
        td.textContent = "";
        var a = document.createElement("a");
        a.href = href;
        a.textContent = text;
        td.appendChild(a);
      };
      cell(new Date(span.start_ns / 1e6).toLocaleString());
      link(cell(""), "/ui/spans/" + encodeURIComponent(span.span_id), span.name);
      var r = cell("", "mono");
      if (span.rollout_id) link(r, "/ui/rollouts/" + encodeURIComponent(span.rollout_id), span.rollout_id);
      var st = cell("");
      var badge = document.createElement("span");
      badge.className = "badge " + span.status;
      badge.textContent = span.status + (span.http_status ? " " + span.http_status : "");
      st.appendChild(badge);
      cell(fmtMs(span.duration_ms), "num");
      cell(String((span.input_tokens || 0) + (span.output_tokens || 0)), "num");
      cell(span.cost_usd == null ? "–" : "$" + span.cost_usd.toFixed(5), "num");
      body.insertBefore(tr, body.firstChild);
      while (body.rows.length > keep) body.deleteRow(body.rows.length - 1);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    refresh(document);
    document.querySelectorAll("[data-live-refresh]").forEach(liveRegion);
    document.querySelectorAll("table[data-tail]").forEach(liveTail);
  });
  document.addEventListener("htmx:afterSettle", function () { refresh(document); });
})();
