/* EdgeFleet dashboard: draws each chart from the JSON block beside it (uPlot), and again after
   htmx swaps in new content. The same numbers are in the table under each chart. */
(function () {
  "use strict";

  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf"];
  /** Every drawn chart by its id (the browser tests read uPlot's data from here). */
  var charts = {};
  window.edgefleetCharts = charts;

  function utc(ts) {
    return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
  }

  var DAY_S = 86400;

  /** Ticks on whole UTC days, labelled as dates, for charts whose x values are days. */
  function dayAxis() {
    return {
      space: 60,
      incrs: [DAY_S, 2 * DAY_S, 7 * DAY_S, 14 * DAY_S, 28 * DAY_S],
      values: function (u, splits) {
        return splits.map(function (ts) { return new Date(ts * 1e3).toISOString().slice(0, 10); });
      }
    };
  }

  /** Series named "figure · side" (two versions or arms on one chart): one colour per figure,
      a dashed line for the second side; others: one colour each, thresholds dashed. */
  function styles(labels) {
    var figures = [], sides = [];
    labels.forEach(function (label) {
      var parts = label.split(" · ");
      if (parts.length === 2) {
        if (figures.indexOf(parts[0]) < 0) figures.push(parts[0]);
        if (sides.indexOf(parts[1]) < 0) sides.push(parts[1]);
      }
    });
    return labels.map(function (label, i) {
      var parts = label.split(" · ");
      if (parts.length === 2 && sides.length > 1) {
        return { stroke: PALETTE[figures.indexOf(parts[0]) % PALETTE.length],
                 dash: sides.indexOf(parts[1]) > 0 ? [6, 3] : undefined };
      }
      return { stroke: PALETTE[i % PALETTE.length], dash: label === "threshold" ? [6, 4] : undefined };
    });
  }

  function draw(spec, box) {
    var width = Math.max(box.clientWidth, 320);
    var style = styles(spec.labels);
    var opts = {
      width: width,
      height: 240,
      tzDate: utc,
      padding: [null, 40, null, null],
      scales: { x: { time: true } },
      axes: [spec.x_unit === "day" ? dayAxis() : {}, { label: spec.y_label, size: 70 }],
      series: [{ label: spec.x_label }].concat(spec.labels.map(function (label, i) {
        return {
          label: label,
          stroke: style[i].stroke,
          width: 2,
          dash: style[i].dash,
          points: { show: true, size: 5 },
          spanGaps: false
        };
      }))
    };
    return new uPlot(opts, spec.data, box);
  }

  function drawAll(root) {
    var blocks = root.querySelectorAll('script[type="application/json"][data-chart]');
    Array.prototype.forEach.call(blocks, function (block) {
      var spec = JSON.parse(block.textContent);
      var box = document.getElementById(spec.id + "-plot");
      if (!box || box.dataset.drawn) return;
      box.dataset.drawn = "1";
      charts[spec.id] = draw(spec, box);
    });
  }

  function resizeAll() {
    Object.keys(charts).forEach(function (id) {
      var box = document.getElementById(id + "-plot");
      if (box) charts[id].setSize({ width: Math.max(box.clientWidth, 320), height: 240 });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawAll(document);
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(resizeAll, 150);
    });
  });
  document.addEventListener("htmx:afterSettle", function (event) {
    drawAll(event.target);
  });
})();
