// The chat page: conversations (store.js), requests to this server's /v1/chat/completions streamed
// over SSE (sse.js), answers rendered as Markdown into DOM nodes (markdown.js), the metrics view.

import { codeBlock, renderMarkdown, splitThinking } from "./markdown.js";
import { MetricsView } from "./metrics.js";
import { ChatAccumulator, readChatStream, StreamError } from "./sse.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const SAMPLING = ["temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed"];
const INTEGER = new Set(["top_k", "max_tokens", "seed"]);

const state = {
  conversations: store.loadConversations(),
  current: null,
  settings: store.loadSettings(),
  apiKey: store.loadApiKey(),
  props: null,
  running: null, // {controller, conv, message} while an answer streams
};

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ------------------------------------------------------------------ the server
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  return h;
}

async function errorOf(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    message = (body.error && (body.error.message || body.error)) || body.detail || message;
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) {
    openSettings(true);
    message = "this server needs an API key: enter it in Settings (" + message + ")";
  }
  return new HTTPError(response.status, message);
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers(false) });
  if (!r.ok) throw await errorOf(r);
  return r.json();
}

async function connect() {
  try {
    const [props, models] = await Promise.all([getJSON("/props"), getJSON("/v1/models")]);
    state.props = props;
    const select = $("model");
    select.replaceChildren();
    for (const m of models.data) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.append(option);
    }
    if (state.settings.model && models.data.some((m) => m.id === state.settings.model)) {
      select.value = state.settings.model;
    }
    const defaults = props.default_generation_settings.params;
    for (const name of SAMPLING) {
      const value = defaults[name];
      $("s-" + name).placeholder = value === null || value === undefined ? "—" : String(value);
    }
    showError("");
  } catch (e) {
    showError("cannot reach the server: " + e.message);
  }
}

// ------------------------------------------------------------------ settings
function openSettings(focusKey) {
  $("settings").hidden = false;
  $("toggle-settings").setAttribute("aria-expanded", "true");
  if (focusKey) $("api-key").focus();
}

function samplingFields() {
  const out = {};
  for (const name of SAMPLING) {
    const raw = $("s-" + name).value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value) || (INTEGER.has(name) && !Number.isInteger(value))) {
      throw new Error(name + ": " + JSON.stringify(raw) + " is not a " + (INTEGER.has(name) ? "whole " : "") + "number");
    }
    out[name] = value;
  }
  return out;
}

function parseTools() {
  const raw = $("tools").value.trim();
  $("tools-error").textContent = "";
  if (!raw) return null;
  let tools;
  try {
    tools = JSON.parse(raw);
  } catch (e) {
    $("tools-error").textContent = "Tools: not JSON (" + e.message + ")";
    throw new Error("the tools box does not hold JSON; fix it or empty it");
  }
  if (!Array.isArray(tools)) tools = [tools];
  return tools.map((t) => (t.type ? t : { type: "function", function: t }));
}

function saveSettings() {
  const sampling = {};
  for (const name of SAMPLING) sampling[name] = $("s-" + name).value;
  state.settings = { ...state.settings, sampling, tools: $("tools").value, model: $("model").value };
  try {
    store.saveSettings(state.settings);
  } catch (e) {
    showError(e.message);
  }
}

function loadSettingsIntoForm() {
  const s = state.settings.sampling || {};
  for (const name of SAMPLING) $("s-" + name).value = s[name] ?? "";
  $("tools").value = state.settings.tools || "";
  $("api-key").value = state.apiKey;
}

// ------------------------------------------------------------------ conversations
function persist() {
  try {
    store.saveConversations(state.conversations);
  } catch (e) {
    showError(e.message);
  }
}

function select(conv) {
  state.current = conv;
  $("system").value = conv.system || "";
  renderList();
  renderMessages();
}

function startNew() {
  if (state.current && !state.current.messages.length) {  // already on an empty chat
    $("prompt").focus();
    return;
  }
  const conv = store.newConversation(state.settings.system || "");
  state.conversations.unshift(conv);
  select(conv);
  $("prompt").focus();
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv";
    open.textContent = conv.title;
    if (conv === state.current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => select(conv));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", "Delete " + conv.title);
    del.addEventListener("click", () => {
      if (state.running && state.running.conv === conv) stop();
      state.conversations = state.conversations.filter((c) => c !== conv);
      persist();
      if (conv === state.current) {
        if (state.conversations.length) select(state.conversations[0]);
        else startNew();
      } else renderList();
    });
    li.append(open, del);
    list.append(li);
  }
}

// ------------------------------------------------------------------ messages
function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conv = state.current;
  conv.messages.forEach((m, i) => box.append(messageNode(conv, m, i)));
  box.scrollTop = box.scrollHeight;
}

function messageNode(conv, m, index) {
  const article = document.createElement("article");
  article.className = "msg " + m.role;
  article.dataset.index = index;
  const who = document.createElement("h3");
  who.className = "who";
  who.textContent = m.fim ? (m.role === "user" ? "You: fill in the middle" : "The middle")
    : m.role === "user" ? "You" : m.role === "assistant" ? "Assistant" : "Tool";
  const body = document.createElement("div");
  body.className = "body";
  article.append(who, body);
  fillBody(body, conv, m, index);
  return article;
}

function fillBody(body, conv, m, index) {
  // keep open <details> (reasoning the reader unfolded) open across re-renders while streaming
  const opened = [...body.querySelectorAll("details")].map((d) => d.open);
  body.replaceChildren();
  if (m.fim && m.role === "user") {
    body.append(codeBlock(m.fim.prefix, ""), folded("Code after the cursor", m.fim.suffix, "fim-suffix"));
  } else if (m.fim) {
    const block = codeBlock(m.content || "", "");
    block.classList.add("middle");
    body.append(block);
    if (m.meta) body.append(metaNode(m.meta));
  } else if (m.role === "user") {
    const p = document.createElement("p");
    p.className = "plain";
    p.textContent = m.content;
    body.append(p);
  } else if (m.role === "tool") {
    const call = findCall(conv, m.tool_call_id);
    body.append(folded("Result of " + (call ? call.function.name : m.tool_call_id), m.content, "tool-result"));
  } else {
    for (const part of splitThinking(m.content || "")) {
      if (part.kind === "think") {
        const d = folded(part.open ? "Thinking…" : "Thought", null, "think");
        d.append(renderMarkdown(part.text));
        body.append(d);
      } else body.append(renderMarkdown(part.text));
    }
    for (const call of m.tool_calls || []) body.append(toolCallNode(conv, call, index));
    if (m.meta) body.append(metaNode(m.meta));
  }
  body.querySelectorAll("details").forEach((d, k) => { if (opened[k]) d.open = true; });
}

function folded(title, text, cls) {
  const d = document.createElement("details");
  d.className = cls;
  const s = document.createElement("summary");
  s.textContent = title;
  d.append(s);
  if (text !== null) {
    const pre = document.createElement("pre");
    pre.textContent = text;
    d.append(pre);
  }
  return d;
}

function findCall(conv, id) {
  for (const m of conv.messages) for (const c of m.tool_calls || []) if (c.id === id) return c;
  return null;
}

function prettyArguments(args) {
  try {
    return JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    return args; // a call cut off by max_tokens: shown as the model wrote it
  }
}

function toolCallNode(conv, call, index) {
  const d = folded("Tool call: " + (call.function.name || "…"), prettyArguments(call.function.arguments), "tool-call");
  d.dataset.tool = call.function.name;
  const answered = conv.messages.some((m) => m.role === "tool" && m.tool_call_id === call.id);
  const isLast = !conv.messages.slice(index + 1).some((m) => m.role !== "tool");
  if (!answered && isLast && !(state.running && state.running.conv === conv)) {
    d.open = true;
    const form = document.createElement("form");
    form.className = "tool-answer";
    const id = "result-" + (call.id || index);
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = "Result of " + call.function.name;
    const area = document.createElement("textarea");
    area.id = id;
    area.rows = 2;
    const send = document.createElement("button");
    send.type = "submit";
    send.textContent = "Send result";
    form.append(label, area, send);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      conv.messages.push({ role: "tool", tool_call_id: call.id, content: area.value });
      conv.updated = Date.now();
      persist();
      const waiting = conv.messages[index].tool_calls.some(
        (c) => !conv.messages.some((m) => m.role === "tool" && m.tool_call_id === c.id));
      if (waiting) renderMessages();
      else generate(conv);
    });
    d.append(form);
  }
  return d;
}

function metaNode(meta) {
  const p = document.createElement("p");
  p.className = "meta";
  const bits = [];
  if (meta.completion_tokens !== undefined) bits.push(meta.completion_tokens + " tokens");
  else if (meta.chunks) bits.push("≈" + meta.chunks + " tokens");
  if (meta.tps) bits.push(meta.tps.toFixed(1) + " tok/s");
  if (meta.ttft_ms !== undefined) bits.push("first token " + Math.round(meta.ttft_ms) + " ms");
  if (meta.prompt_tokens !== undefined && meta.n_ctx) {
    const used = meta.prompt_tokens + (meta.completion_tokens || 0);
    bits.push(`context ${used}/${meta.n_ctx} (${Math.round((100 * used) / meta.n_ctx)}%)`);
  }
  if (meta.cached_tokens) bits.push(meta.cached_tokens + " cached");
  if (meta.finish) bits.push(meta.finish);
  p.textContent = bits.join(" · ");
  return p;
}

// ------------------------------------------------------------------ generating
function showError(text) {
  $("error").hidden = !text;
  $("error").textContent = text;
}

function setRunning(running) {
  state.running = running;
  $("stop").hidden = !running;
  $("send").disabled = !!running;
  $("regenerate").disabled = !!running;
  $("status").textContent = running ? "generating…" : "";
}

// [url, body] of the request that answers the conversation's last turn: a chat completion, or a
// fill-in-the-middle completion when that turn is one (the FIM route streams the same chunks).
function request(conv) {
  const last = conv.messages[conv.messages.length - 1];
  const model = $("model").value || undefined;
  if (last && last.fim) {
    return ["/v1/fim/completions", { model, prompt: last.fim.prefix, suffix: last.fim.suffix, stream: true,
                                     ...samplingFields() }];
  }
  const tools = parseTools();
  conv.tools = tools || undefined;
  const messages = [];
  if (conv.system && conv.system.trim()) messages.push({ role: "system", content: conv.system });
  for (const m of store.chatHistory(conv)) messages.push(store.apiMessage(m));
  const body = { model, messages, stream: true, stream_options: { include_usage: true }, ...samplingFields() };
  if (tools) body.tools = tools;
  return ["/v1/chat/completions", body];
}

async function generate(conv) {
  if (state.running) return;
  showError("");
  let url, body;
  try {
    [url, body] = request(conv);
  } catch (e) {
    showError(e.message);
    return;
  }
  const message = { role: "assistant", content: "", meta: {} };
  if (url.startsWith("/v1/fim/")) message.fim = true;
  conv.messages.push(message);
  const index = conv.messages.length - 1;
  const controller = new AbortController();
  setRunning({ controller, conv, message });
  renderMessages();
  const node = () => $("messages").querySelector(`article[data-index="${index}"] .body`);
  node()?.closest("article").setAttribute("aria-busy", "true");
  const acc = new ChatAccumulator();
  const t0 = performance.now();
  let tFirst = null;
  let pending = false;
  const paint = () => {
    pending = false;
    if (state.current !== conv) return;
    Object.assign(message, acc.message, { meta: message.meta, fim: message.fim });
    const target = node();
    if (target) {
      fillBody(target, conv, message, index);
      const box = $("messages");
      if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
    }
  };
  try {
    const response = await fetch(url, {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    await readChatStream(response, acc, () => {
      if (tFirst === null) tFirst = performance.now();
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    });
    message.meta.finish = acc.finishReason || "ended";
  } catch (e) {
    if (e.name === "AbortError") message.meta.finish = "stopped";
    else {
      message.meta.finish = "error";
      showError(e instanceof StreamError ? "the server stopped the answer: " + e.message : e.message);
    }
  }
  const tEnd = performance.now();
  Object.assign(message, acc.message, { meta: message.meta, fim: message.fim });
  const meta = message.meta;
  meta.chunks = acc.chunks;
  if (tFirst !== null) meta.ttft_ms = tFirst - t0;
  if (acc.usage) {
    meta.prompt_tokens = acc.usage.prompt_tokens;
    meta.completion_tokens = acc.usage.completion_tokens;
    meta.cached_tokens = acc.usage.prompt_tokens_details?.cached_tokens || 0;
    // decode speed: the tokens after the first over the time after it (the first one waits for prefill)
    if (tFirst !== null && meta.completion_tokens > 1 && tEnd > tFirst) {
      meta.tps = ((meta.completion_tokens - 1) * 1000) / (tEnd - tFirst);
    }
  }
  if (state.props) meta.n_ctx = state.props.default_generation_settings.n_ctx;
  if (!message.content && !message.tool_calls && meta.finish === "error") conv.messages.pop();
  conv.updated = Date.now();
  conv.title = store.titleOf(conv);
  setRunning(null);
  persist();
  if (state.current === conv) {
    renderList();
    renderMessages();
  }
}

function stop() {
  if (state.running) state.running.controller.abort();
}

function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.running) return;
  const conv = state.current;
  if ($("mode").value === "fim") {
    const suffix = $("suffix").value;
    conv.messages.push({ role: "user", content: text, fim: { prefix: text, suffix } });
    $("suffix").value = "";
  } else conv.messages.push({ role: "user", content: text });
  conv.title = store.titleOf(conv);
  $("prompt").value = "";
  generate(conv);
}

function setMode() {
  const fim = $("mode").value === "fim";
  $("suffix").hidden = !fim;
  $("composer").classList.toggle("fim", fim);
  $("prompt-label").textContent = fim ? "Code before the cursor" : "Message";
  $("prompt").placeholder = fim ? "Code before the cursor (Ctrl+Enter fills in the middle)"
    : "Message (Enter sends, Shift+Enter starts a new line, Esc stops)";
}

function regenerate() {
  const conv = state.current;
  if (state.running || !conv.messages.length) return;
  const lastUser = conv.messages.map((m) => m.role).lastIndexOf("user");
  if (lastUser < 0) return;
  conv.messages.splice(lastUser + 1);
  generate(conv);
}

function exportAll() {
  const text = store.exportJSONL(state.conversations);
  const url = URL.createObjectURL(new Blob([text], { type: "application/jsonl" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = "devstral-chats-" + new Date().toISOString().slice(0, 10) + ".jsonl";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ------------------------------------------------------------------ wiring
function showView(name) {
  const metrics = name === "metrics";
  $("chat-view").hidden = metrics;
  $("metrics-view").hidden = !metrics;
  $("tab-chat").setAttribute("aria-pressed", String(!metrics));
  $("tab-metrics").setAttribute("aria-pressed", String(metrics));
  if (metrics) metricsView.start();
  else metricsView.stop();
}

const metricsView = new MetricsView($("metrics-view"), async () => {
  const r = await fetch("/metrics", { headers: headers(false) });
  if (!r.ok) throw await errorOf(r);
  return r.text();
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (e) => {
  // code wants its newlines: in fill-in-the-middle mode only Ctrl+Enter sends
  const sends = $("mode").value === "fim" ? e.ctrlKey || e.metaKey : !e.shiftKey;
  if (e.key === "Enter" && sends && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.running) stop(); });
$("stop").addEventListener("click", stop);
$("mode").addEventListener("change", setMode);
$("regenerate").addEventListener("click", regenerate);
$("new-chat").addEventListener("click", startNew);
$("export").addEventListener("click", exportAll);
$("tab-chat").addEventListener("click", () => showView("chat"));
$("tab-metrics").addEventListener("click", () => showView("metrics"));
$("toggle-settings").addEventListener("click", () => {
  const open = $("settings").hidden;
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
});
$("system").addEventListener("change", () => {
  state.current.system = $("system").value;
  state.settings.system = $("system").value; // new chats start with the last one used
  saveSettings();
  persist();
});
for (const name of SAMPLING) $("s-" + name).addEventListener("change", saveSettings);
$("tools").addEventListener("change", () => {
  try {
    parseTools();
  } catch { /* the message is shown next to the box */ }
  saveSettings();
});
$("model").addEventListener("change", saveSettings);
$("reset-sampling").addEventListener("click", () => {
  for (const name of SAMPLING) $("s-" + name).value = "";
  saveSettings();
});
$("key-form").addEventListener("submit", (e) => e.preventDefault());
$("api-key").addEventListener("change", () => {
  state.apiKey = $("api-key").value.trim();
  store.saveApiKey(state.apiKey);
  connect();
});
window.addEventListener("storage", (e) => { // another tab changed the conversations
  if (e.key === "devstral.conversations" && !state.running) {
    state.conversations = store.loadConversations();
    const same = state.conversations.find((c) => c.id === state.current?.id);
    if (same) select(same);
    else if (state.conversations.length) select(state.conversations[0]);
    else startNew();
  }
});

loadSettingsIntoForm();
if (state.conversations.length) select(state.conversations[0]);
else startNew();
connect();
document.documentElement.dataset.ready = "true";
