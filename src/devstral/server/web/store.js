// Conversations and settings, kept in this browser's localStorage (nothing is stored on the server).
//
// A conversation: {id, title, created, updated, system, tools, messages: [...]}. Messages are OpenAI
// chat messages (role, content, tool_calls, tool_call_id) plus `meta` on answers (token counts, speed,
// finish reason), which the page shows and the export leaves out. Fill-in-the-middle turns (`fim` set)
// live in the same list but are not chat: neither sent as history nor exported.

const KEY = "devstral.conversations";
const SETTINGS = "devstral.settings";
const API_KEY = "devstral.apiKey";

export class QuotaError extends Error {}

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback; // unreadable (edited by hand, another app's data): start afresh rather than break
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    throw new QuotaError("the browser's storage for this page is full (" + e.name + "); " +
      "export and delete old conversations");
  }
}

export const loadConversations = () => {
  const list = read(KEY, []);
  return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
};
export const saveConversations = (list) => write(KEY, list);
export const loadSettings = () => read(SETTINGS, {});
export const saveSettings = (s) => write(SETTINGS, s);
export const loadApiKey = () => localStorage.getItem(API_KEY) || "";
export const saveApiKey = (k) => (k ? localStorage.setItem(API_KEY, k) : localStorage.removeItem(API_KEY));

export function newConversation(system = "") {
  const now = Date.now();
  const id = crypto.randomUUID ? crypto.randomUUID() : String(now) + Math.random().toString(16).slice(2);
  return { id, title: "New chat", created: now, updated: now, system, messages: [] };
}

export function titleOf(conv) {
  const first = conv.messages.find((m) => m.role === "user" && typeof m.content === "string");
  if (!first) return "New chat";
  const line = first.content.trim().split("\n")[0];
  return line.length > 60 ? line.slice(0, 57) + "…" : line || "New chat";
}

// The messages a chat request (or a training record) holds: no FIM turns, no empty answers.
export function chatHistory(conv) {
  return conv.messages.filter((m) => !m.fim &&
    !(m.role === "assistant" && !m.content && !(m.tool_calls && m.tool_calls.length)));
}

// The message as the API and the training data want it: OpenAI's fields only.
export function apiMessage(m) {
  const out = { role: m.role, content: m.content ?? "" };
  if (m.tool_calls && m.tool_calls.length) {
    out.tool_calls = m.tool_calls.map((c) => ({
      id: c.id, type: "function", function: { name: c.function.name, arguments: c.function.arguments },
    }));
  }
  if (m.role === "tool") out.tool_call_id = m.tool_call_id;
  return out;
}

// One training record per conversation, in the JSONL shape `devstral finetune --data` reads:
// {"messages": [...], "tools": [...]} (the tools the conversation was last sent with). Answers with
// nothing in them (stopped before a token) are left out.
export function trainingRecord(conv) {
  const messages = [];
  if (conv.system && conv.system.trim()) messages.push({ role: "system", content: conv.system });
  for (const m of chatHistory(conv)) messages.push(apiMessage(m));
  const record = { messages };
  if (conv.tools && conv.tools.length) record.tools = conv.tools;
  return record;
}

export function exportJSONL(conversations) {
  return conversations.filter((c) => chatHistory(c).some((m) => m.role === "assistant"))
    .map((c) => JSON.stringify(trainingRecord(c))).join("\n") + "\n";
}
