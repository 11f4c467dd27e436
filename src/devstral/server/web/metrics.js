// The metrics view: /metrics (Prometheus text) polled while the view is open, a few series as small
// SVG plots. Speeds are derived from the engine's token counters between polls, so they show what the
// server does now, not an average since it started.

const SVG = "http://www.w3.org/2000/svg";
const KEEP = 120; // samples per plot

// {name: value} of samples without labels, and {name: [{labels, value}]} of all of them.
export function parsePrometheus(text) {
  const plain = {};
  const all = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const value = Number(m[3]);
    (all[m[1]] ||= []).push({ labels: m[2] || "", value });
    if (!m[2]) plain[m[1]] = value;
  }
  return { plain, all };
}

const SERIES = [
  { key: "active", title: "Requests running", unit: "", digits: 0 },
  { key: "queue", title: "Queue depth", unit: "", digits: 0 },
  { key: "tps", title: "Generation speed", unit: " tok/s", digits: 1 },
  { key: "prompt_tps", title: "Prompt processing", unit: " tok/s", digits: 1 },
  { key: "hit", title: "Prefix-cache hit rate", unit: " %", digits: 1 },
];

export class MetricsView {
  constructor(root, fetchText) {
    this.root = root;
    this.fetchText = fetchText;
    this.samples = [];
    this.timer = null;
    this.plots = {};
    this.status = root.querySelector("[data-metrics-status]");
    const grid = root.querySelector("[data-metrics-grid]");
    for (const s of SERIES) {
      const card = document.createElement("figure");
      card.className = "plot";
      card.dataset.series = s.key;
      const cap = document.createElement("figcaption");
      const name = document.createElement("span");
      name.textContent = s.title;
      const value = document.createElement("output");
      value.textContent = "–";
      cap.append(name, value);
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 240 60");
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", s.title + " over the last " + KEEP + " samples");
      const area = document.createElementNS(SVG, "polyline");
      area.setAttribute("class", "line");
      svg.append(area);
      card.append(cap, svg);
      grid.append(card);
      this.plots[s.key] = { value, area, spec: s };
    }
  }

  start(intervalMs = 1000) {
    if (this.timer) return;
    const tick = () => this.poll().finally(() => { if (this.timer) this.timer = setTimeout(tick, intervalMs); });
    this.timer = setTimeout(tick, 0);
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  async poll() {
    let text;
    try {
      text = await this.fetchText();
    } catch (e) {
      this.status.textContent = "metrics unavailable: " + e.message;
      return;
    }
    const { plain } = parsePrometheus(text);
    const now = performance.now() / 1000;
    const prev = this.samples[this.samples.length - 1];
    const sample = {
      t: now,
      // the engine's live counters; the request totals (which move when a request ends) without one
      completion: plain.devstral_engine_generated_tokens_total ?? plain.devstral_completion_tokens_total ?? 0,
      prompt: plain.devstral_engine_prompt_tokens_total ?? plain.devstral_prompt_tokens_total ?? 0,
      active: plain.devstral_requests_active ?? 0,
      queue: plain.devstral_queue_depth ?? 0,
      hit: plain.devstral_prefix_cache_hit_rate === undefined ? null : 100 * plain.devstral_prefix_cache_hit_rate,
    };
    const dt = prev ? now - prev.t : 0;
    sample.tps = prev && dt > 0 ? Math.max(0, (sample.completion - prev.completion) / dt) : 0;
    sample.prompt_tps = prev && dt > 0 ? Math.max(0, (sample.prompt - prev.prompt) / dt) : 0;
    this.samples.push(sample);
    if (this.samples.length > KEEP) this.samples.shift();
    const slots = plain.devstral_slots_total;
    this.status.textContent = `slots ${sample.active}/${slots ?? "?"} · ` +
      `${plain.devstral_requests_cancelled_total ?? 0} stopped · ` +
      `${Math.round(plain.devstral_uptime_seconds ?? 0)} s up`;
    for (const key of Object.keys(this.plots)) this.draw(key);
  }

  draw(key) {
    const { value, area, spec } = this.plots[key];
    const ys = this.samples.map((s) => s[key]);
    const last = ys[ys.length - 1];
    value.textContent = last === null || last === undefined ? "n/a" : last.toFixed(spec.digits) + spec.unit;
    const known = ys.filter((y) => y !== null);
    const top = Math.max(key === "hit" ? 100 : 1, ...known);
    const points = [];
    ys.forEach((y, i) => {
      if (y === null) return;
      const x = (240 * (KEEP - ys.length + i)) / (KEEP - 1);
      points.push(x.toFixed(1) + "," + (58 - (56 * y) / top).toFixed(1));
    });
    area.setAttribute("points", points.join(" "));
  }
}
