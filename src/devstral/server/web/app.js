// devstral's web chat: talks only to this server's OpenAI routes (streaming chat completions) and /metrics.
// Model text is untrusted: it reaches the page only through escapeHtml() or textContent.
"use strict";

const STORE = "devstral.conversations";
const SETTINGS = "devstral.settings";
const $ = (id) => document.getElementById(id);

const state = { convs: [], current: null, model: null, contextLength: null, defaults: {}, controller: null };

// ------------------------------------------------------------------ storage
function load() {
  try { state.convs = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch { state.convs = []; }
  const s = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const k of ["system", "temperature", "top_p", "max_tokens", "tools", "api_key"]) if (s[k] !== undefined) $(k).value = s[k];
  state.current = state.convs[0] ? state.convs[0].id : null;
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(state.convs));
  const s = {};
  for (const k of ["system", "temperature", "top_p", "max_tokens", "tools", "api_key"]) s[k] = $(k).value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}
function conv() { return state.convs.find((c) => c.id === state.current); }
function newConv() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
  state.convs.unshift(c);
  state.current = c.id;
  save();
  render();
  return c;
}

// ------------------------------------------------------------------ markdown (escape first, then format)
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch]));
}
const KEYWORDS = new Set(("def class return if elif else for while in not and or import from as with try except finally " +
  "raise lambda yield pass break continue None True False async await function const let var new this typeof " +
  "public private static void int float str bool fn impl struct enum match use pub mut echo then fi do done case esac").split(" "));
function highlight(code) {
  // one pass over the raw code; each piece is escaped on its own
  const re = /(#[^\n]*|\/\/[^\n]*)|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_]\w*)/g;
  let out = "", last = 0, m;
  while ((m = re.exec(code)) !== null) {
    out += escapeHtml(code.slice(last, m.index));
    const t = escapeHtml(m[0]);
    if (m[1]) out += `<span class="com">${t}</span>`;
    else if (m[2]) out += `<span class="str">${t}</span>`;
    else if (m[3]) out += `<span class="num">${t}</span>`;
    else out += KEYWORDS.has(m[4]) ? `<span class="kw">${t}</span>` : t;
    last = re.lastIndex;
  }
  return out + escapeHtml(code.slice(last));
}
function inline(text) {
  // text is already escaped; links only to http(s)
  return text
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
}
function markdown(src) {
  let html = "";
  const fence = /```([\w+-]*)[^\n]*\n([\s\S]*?)(?:```|$)/g;
  let last = 0, m;
  while ((m = fence.exec(src)) !== null) {
    html += blocks(src.slice(last, m.index));
    html += `<pre><code data-lang="${escapeHtml(m[1])}">${highlight(m[2])}</code></pre>`;
    last = fence.lastIndex;
  }
  return html + blocks(src.slice(last));
}
function blocks(text) {
  const out = [];
  for (const para of escapeHtml(text).split(/\n{2,}/)) {
    if (!para.trim()) continue;
    const lines = para.split("\n");
    const h = /^(#{1,6}) (.*)$/.exec(lines[0]);
    if (h && lines.length === 1) { out.push(`<h${h[1].length}>${inline(h[2])}</h${h[1].length}>`); continue; }
    if (lines.every((l) => /^\s*([-*]|\d+\.) /.test(l))) {
      const tag = /^\s*\d+\./.test(lines[0]) ? "ol" : "ul";
      out.push(`<${tag}>` + lines.map((l) => `<li>${inline(l.replace(/^\s*([-*]|\d+\.) /, ""))}</li>`).join("") + `</${tag}>`);
      continue;
    }
    out.push(`<p>${lines.map(inline).join("<br>")}</p>`);
  }
  return out.join("");
}

// ------------------------------------------------------------------ rendering
function details(cls, summary, body) {
  const d = document.createElement("details");
  d.className = cls;
  const s = document.createElement("summary");
  s.textContent = summary;
  d.append(s, body);
  return d;
}
function pre(text) {
  const p = document.createElement("pre");
  const c = document.createElement("code");
  c.textContent = text;
  p.append(c);
  return p;
}
function renderContent(el, text) {
  // [THINK]...[/THINK] folded; the rest as markdown
  el.replaceChildren();
  const parts = text.split(/(\[THINK\][\s\S]*?(?:\[\/THINK\]|$))/);
  for (const part of parts) {
    if (!part) continue;
    if (part.startsWith("[THINK]")) {
      const body = document.createElement("div");
      body.innerHTML = markdown(part.replace(/^\[THINK\]/, "").replace(/\[\/THINK\]$/, ""));
      el.append(details("think", "Reasoning", body));
    } else {
      const div = document.createElement("div");
      div.innerHTML = markdown(part);
      el.append(div);
    }
  }
}
function renderMessage(m) {
  const box = document.createElement("div");
  box.className = `msg ${m.role}` + (m.error ? " error" : "");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = m.role === "tool" ? `tool result${m.name ? " · " + m.name : ""}` : m.role;
  const body = document.createElement("div");
  body.className = "body";
  box.append(who, body);
  if (m.role === "tool") body.append(details("tool", "output", pre(m.content || "")));
  else if (m.fim && m.role === "user") {
    who.textContent = "fill in the middle";
    body.append(pre(m.fim.prefix), details("tool", "code after the cursor", pre(m.fim.suffix || "")));
  } else if (m.fim) {
    const code = document.createElement("pre");
    code.className = "middle";
    code.innerHTML = `<code>${highlight(m.content || "")}</code>`;
    body.append(code);
  } else renderContent(body, m.content || "");
  for (const call of m.tool_calls || []) {
    let args = call.function.arguments || "";
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch { /* partial or invalid: shown as is */ }
    const d = details("tool", `tool call · ${call.function.name || "?"}`, pre(args));
    d.open = true;
    d.dataset.name = call.function.name || "";
    box.append(d);
  }
  if (m.error) { const e = document.createElement("div"); e.textContent = m.error; box.append(e); }
  if (m.stats) {
    const st = document.createElement("div");
    st.className = "stats";
    st.textContent = m.stats;
    box.append(st);
  }
  return box;
}
function render() {
  const list = $("convs");
  list.replaceChildren(...state.convs.map((c) => {
    const li = document.createElement("li");
    li.textContent = c.title;
    li.className = c.id === state.current ? "active" : "";
    li.addEventListener("click", () => { state.current = c.id; render(); });
    return li;
  }));
  const c = conv();
  $("messages").replaceChildren(...(c ? c.messages.map(renderMessage) : []));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// ------------------------------------------------------------------ requests
function headers() {
  const h = { "content-type": "application/json" };
  if ($("api_key").value) h.authorization = `Bearer ${$("api_key").value}`;
  return h;
}
function num(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }
async function fetchModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("status").textContent = r.status === 401 ? "API key needed (Settings)" : `models: ${r.status}`; return; }
    const card = (await r.json()).data[0];
    state.model = card.id;
    state.contextLength = card.context_length;
    state.defaults = card.default_sampling || {};
    $("model").textContent = card.id;
    for (const k of ["temperature", "top_p"]) if ($(k).value === "" && state.defaults[k] != null) $(k).value = state.defaults[k];
  } catch (e) { $("status").textContent = String(e); }
}

async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function applyDelta(msg, delta) {
  if (delta.content) msg.content = (msg.content || "") + delta.content;
  for (const tc of delta.tool_calls || []) {
    msg.tool_calls = msg.tool_calls || [];
    const slot = msg.tool_calls[tc.index] || (msg.tool_calls[tc.index] = { id: "", type: "function", function: { name: "", arguments: "" } });
    if (tc.id) slot.id = tc.id;
    if (tc.function && tc.function.name) slot.function.name += tc.function.name;
    if (tc.function && tc.function.arguments) slot.function.arguments += tc.function.arguments;
  }
}

function chatRequest(c) {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  for (const m of c.messages) {
    if (m.fim || m.error) continue;  // fill-in-the-middle turns and failed answers are not chat history
    const out = { role: m.role, content: m.content || "" };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
    messages.push(out);
  }
  const body = { model: state.model || "devstral", messages, stream: true, stream_options: { include_usage: true },
                 temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens") };
  if ($("tools").value.trim()) c.tools = body.tools = JSON.parse($("tools").value);  // checked by the caller
  return ["/v1/chat/completions", body];
}
function fimRequest(user) {
  return ["/v1/fim/completions", { model: state.model || "devstral", prompt: user.fim.prefix, suffix: user.fim.suffix,
                                   stream: true, temperature: num("temperature"), top_p: num("top_p"),
                                   max_tokens: num("max_tokens") }];
}

async function generate() {
  const c = conv();
  const user = c.messages[c.messages.length - 1];
  const msg = { role: "assistant", content: "", fim: user.fim ? true : undefined };
  let url, body;
  try {
    [url, body] = user.fim ? fimRequest(user) : chatRequest(c);  // before the answer joins the history
  } catch (e) {
    msg.error = `Settings, Tools: not JSON (${e.message})`;
  }
  c.messages.push(msg);
  if (msg.error) { save(); render(); return; }
  render();
  let box = $("messages").lastElementChild;
  state.controller = new AbortController();
  $("stop").disabled = false; $("send").disabled = true; $("regen").disabled = true;
  const t0 = performance.now();
  let tFirst = null, usage = null;
  try {
    const r = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                 signal: state.controller.signal });
    if (!r.ok) {
      let text = `${r.status}`;
      try { text = (await r.json()).error.message; } catch { /* not JSON */ }
      throw new Error(text);
    }
    for await (const chunk of sse(r)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (tFirst === null && (choice.delta.content || choice.delta.tool_calls)) tFirst = performance.now();
      applyDelta(msg, choice.delta);
      const fresh = renderMessage(msg);
      box.replaceWith(fresh);
      box = fresh;
      box.scrollIntoView({ block: "end" });
      if (choice.finish_reason) msg.finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") msg.finish = "stopped";
    else msg.error = String(e.message || e);
  } finally {
    state.controller = null;
    $("stop").disabled = true; $("send").disabled = false; $("regen").disabled = false;
  }
  const t1 = performance.now();
  const parts = [];
  if (usage) {
    if (tFirst !== null && usage.completion_tokens > 1) parts.push(`${((usage.completion_tokens - 1) / ((t1 - tFirst) / 1000)).toFixed(1)} tok/s`);
    parts.push(`${usage.completion_tokens} tokens`);
    if (state.contextLength) parts.push(`context ${usage.total_tokens} / ${state.contextLength}`);
  }
  if (tFirst !== null) parts.push(`first token ${Math.round(tFirst - t0)} ms`);
  if (msg.finish === "stopped") parts.push("stopped");
  msg.stats = parts.join(" · ");
  save();
  render();
}

async function send(ev) {
  if (ev) ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  const c = conv() || newConv();
  if (!c.messages.length) c.title = text.slice(0, 40);
  if ($("mode").value === "fim") {
    const suffix = $("suffix").value;
    c.messages.push({ role: "user", content: text, fim: { prefix: text, suffix } });
    $("suffix").value = "";
  } else {
    c.messages.push({ role: "user", content: text });
  }
  $("input").value = "";
  save();
  await generate();
}
async function regenerate() {
  const c = conv();
  if (!c || state.controller) return;
  while (c.messages.length && c.messages[c.messages.length - 1].role !== "user") c.messages.pop();
  if (c.messages.length) await generate();
}
function exportJsonl() {
  const records = state.convs.map((c) => {
    const messages = [];
    if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
    for (const m of c.messages) {
      if (m.error || m.fim) continue;
      const out = { role: m.role, content: m.content || "" };
      if (m.tool_calls) out.tool_calls = m.tool_calls;
      if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
      messages.push(out);
    }
    if (!messages.some((m) => m.role === "assistant")) return null;
    // the tools the calls were made against travel with them, as devstral finetune expects
    return JSON.stringify(messages.some((m) => m.tool_calls) && c.tools ? { messages, tools: c.tools } : { messages });
  });
  const lines = records.filter((line) => line !== null);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "application/jsonl" }));
  a.download = "devstral-conversations.jsonl";
  a.click();
  URL.revokeObjectURL(a.href);
}

// ------------------------------------------------------------------ metrics
const SERIES = { "requests active": [], "queue depth": [], "tok/s": [], "prefix-cache hit %": [] };
let previous = null;
function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const m = /^devstral_(\w+)(?:\{[^}]*\})? ([\d.eE+-]+)$/.exec(line);
    if (m) values[m[1]] = (values[m[1]] || 0) + Number(m[2]);
  }
  return values;
}
function plot(name, points) {
  let div = document.querySelector(`.plot[data-name="${name}"]`);
  if (!div) {
    div = document.createElement("div");
    div.className = "plot";
    div.dataset.name = name;
    div.append(document.createElement("span"), document.createElement("canvas"));
    $("plots").append(div);
  }
  const last = points.length ? points[points.length - 1] : 0;
  div.firstChild.textContent = `${name}: ${Number.isInteger(last) ? last : last.toFixed(1)}`;
  const canvas = div.lastChild;
  canvas.width = canvas.clientWidth || 240;
  canvas.height = 36;
  const g = canvas.getContext("2d");
  const max = Math.max(1, ...points);
  g.strokeStyle = getComputedStyle(document.body).color;
  g.beginPath();
  points.forEach((v, i) => {
    const x = (i / Math.max(1, points.length - 1)) * canvas.width, y = canvas.height - 2 - (v / max) * (canvas.height - 4);
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
}
async function pollMetrics() {
  if (!$("metrics").open) return;
  try {
    const r = await fetch("/metrics", { headers: headers() });
    if (!r.ok) return;
    const v = parseMetrics(await r.text());
    const hit = previous && v.prefix_cache_queried_tokens_total > previous.prefix_cache_queried_tokens_total
      ? 100 * (v.prefix_cache_hit_tokens_total - previous.prefix_cache_hit_tokens_total) /
        (v.prefix_cache_queried_tokens_total - previous.prefix_cache_queried_tokens_total) : 0;
    const sample = { "requests active": v.requests_active || 0, "queue depth": v.queue_depth || 0,
                     "tok/s": v.tokens_per_second || 0, "prefix-cache hit %": hit };
    previous = v;
    for (const [name, value] of Object.entries(sample)) {
      SERIES[name].push(value);
      if (SERIES[name].length > 60) SERIES[name].shift();
      plot(name, SERIES[name]);
    }
  } catch { /* the next poll tries again */ }
}

// ------------------------------------------------------------------ wiring
window.addEventListener("DOMContentLoaded", () => {
  load();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && $("mode").value === "chat") send(e);  // code wants its newlines
  });
  $("mode").addEventListener("change", () => {
    const fim = $("mode").value === "fim";
    $("suffix").hidden = !fim;
    $("input").placeholder = fim ? "Code before the cursor (Send fills in the middle)"
                                 : "Message (Enter to send, Shift+Enter for a new line)";
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("regen").addEventListener("click", regenerate);
  $("new").addEventListener("click", newConv);
  $("export").addEventListener("click", exportJsonl);
  $("delete").addEventListener("click", () => {
    state.convs = state.convs.filter((c) => c.id !== state.current);
    state.current = state.convs[0] ? state.convs[0].id : null;
    save(); render();
  });
  $("defaults").addEventListener("click", () => {
    for (const k of ["temperature", "top_p", "max_tokens"]) $(k).value = state.defaults[k] ?? "";
    save();
  });
  for (const k of ["system", "temperature", "top_p", "max_tokens", "tools"]) $(k).addEventListener("change", save);
  $("api_key").addEventListener("change", () => { save(); fetchModel(); });
  render();
  fetchModel();
  setInterval(pollMetrics, 2000);
});
