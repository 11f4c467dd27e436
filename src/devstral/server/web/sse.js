// Server-sent events and OpenAI chat-completion chunks, read incrementally.
//
// SSEParser follows the WHATWG event-stream rules: lines end in CRLF, LF or CR (a CR at the end of
// one network chunk may be the first half of a CRLF), "data:" lines of one event are joined with
// LF, one space after the colon is dropped, comment lines (":") are ignored, and an event is
// dispatched at a blank line. Bytes are decoded with a streaming TextDecoder, so a UTF-8 character
// split across chunks stays whole.

export class SSEParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.buffer = "";
    this.data = [];
    this.event = "";
    this.sawCR = false;
  }

  // Feed bytes (Uint8Array) or text; returns the events completed by it: [{event, data}].
  feed(chunk) {
    const text = typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    return this._lines(text);
  }

  // The end of the stream: an event without its final blank line is dropped, as the spec says.
  end() {
    const rest = this.decoder.decode();
    return rest ? this._lines(rest) : [];
  }

  _lines(text) {
    const out = [];
    let buf = this.buffer + text;
    if (this.sawCR && buf.startsWith("\n")) buf = buf.slice(1); // the LF of a CRLF split across chunks
    this.sawCR = false;
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf[i];
      if (c !== "\n" && c !== "\r") continue;
      this._line(buf.slice(start, i), out);
      if (c === "\r") {
        if (i + 1 === buf.length) this.sawCR = true;
        else if (buf[i + 1] === "\n") i++;
      }
      start = i + 1;
    }
    this.buffer = buf.slice(start);
    return out;
  }

  _line(line, out) {
    if (line === "") {
      if (this.data.length) out.push({ event: this.event || "message", data: this.data.join("\n") });
      this.data = [];
      this.event = "";
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
  }
}

export class StreamError extends Error {}

// Folds chat.completion.chunk objects into one assistant message, as OpenAI's clients do: content
// appended, tool calls gathered by their `index` (id and name arrive once, arguments in pieces).
export class ChatAccumulator {
  constructor() {
    this.content = "";
    this.toolCalls = [];
    this.finishReason = null;
    this.usage = null;
    this.chunks = 0;
  }

  // Returns true when the chunk changed what is shown.
  apply(chunk) {
    if (chunk.error) throw new StreamError(chunk.error.message || JSON.stringify(chunk.error));
    if (chunk.usage) this.usage = chunk.usage;
    const choice = (chunk.choices || []).find((c) => (c.index || 0) === 0);
    if (!choice) return false;
    this.chunks++;
    const delta = choice.delta || {};
    let changed = false;
    if (typeof delta.content === "string" && delta.content) {
      this.content += delta.content;
      changed = true;
    }
    for (const call of delta.tool_calls || []) {
      const at = Number.isInteger(call.index) ? call.index : this.toolCalls.length;
      const slot = (this.toolCalls[at] ||= { id: "", type: "function", function: { name: "", arguments: "" } });
      if (call.id) slot.id = call.id;
      if (call.type) slot.type = call.type;
      const fn = call.function || {};
      if (fn.name) slot.function.name += fn.name;
      if (fn.arguments) slot.function.arguments += fn.arguments;
      changed = true;
    }
    if (choice.finish_reason) this.finishReason = choice.finish_reason;
    return changed;
  }

  get message() {
    const message = { role: "assistant", content: this.content };
    const calls = this.toolCalls.filter(Boolean);
    if (calls.length) message.tool_calls = calls;
    return message;
  }
}

// Reads a fetch Response body of SSE chunks into `acc`; calls onUpdate after each change.
export async function readChatStream(response, acc, onUpdate) {
  const parser = new SSEParser();
  const reader = response.body.getReader();
  const handle = (events) => {
    for (const { data } of events) {
      if (data === "[DONE]") return true;
      if (acc.apply(JSON.parse(data))) onUpdate();
    }
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return handle(parser.end());
    if (handle(parser.feed(value))) {
      reader.cancel().catch(() => {});
      return true;
    }
  }
}
