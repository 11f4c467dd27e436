// Markdown -> DOM for model answers, which are untrusted text. Every element is made with
// createElement and every piece of text goes into a text node, so "<script>" in an answer is shown,
// never run (the page's Trusted Types policy would refuse an HTML string anyway). Links keep only
// http(s) and mailto targets; images are shown as links and never loaded, so an answer cannot make
// the browser fetch a URL on its own (a prompt-injected model could put data in one).
//
// Covered: fenced code (with colouring), headings, paragraphs, lists (nested, ordered, tasks),
// block quotes, tables, rules, inline code, emphasis, strike-through, links and autolinks. A fence
// still open (while the answer streams in) is shown as code up to the end.

import { highlight } from "./highlight.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)/;
const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

const el = (tag, cls) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return node;
};

export function safeHref(url) {
  const trimmed = url.trim();
  return /^(https?:\/\/|mailto:)/i.test(trimmed) ? trimmed : null;
}

export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  blocks(text.replace(/\r\n?/g, "\n").split("\n"), frag);
  return frag;
}

function isBlockStart(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_RULE.test(next) && next.includes("-"));
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    let m;
    if ((m = FENCE.exec(line))) {
      const marker = m[1];
      const close = new RegExp("^ {0,3}" + marker[0] + "{" + marker.length + ",}\\s*$");
      const body = [];
      i++;
      while (i < lines.length && !close.test(lines[i])) body.push(lines[i++]);
      i++; // the closing fence (or past the end while it streams)
      parent.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      const h = el("h" + Math.min(m[1].length + 2, 6)); // h1 and h2 belong to the page
      inline(m[2] || "", h);
      parent.append(h);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && lines[i].trim() && (QUOTE.test(lines[i]) || inner.length)) {
        if (!QUOTE.test(lines[i]) && isBlockStart(lines[i], lines[i + 1])) break;
        inner.push(lines[i++].replace(QUOTE, ""));
      }
      const quote = el("blockquote");
      blocks(inner, quote);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) &&
               lines[i + 1].includes("-")) {
      i = table(lines, i, parent);
    } else {
      const para = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i], lines[i + 1])) para.push(lines[i++]);
      const p = el("p");
      inline(para.map((s) => s.trim()).join("\n"), p);
      parent.append(p);
    }
  }
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let loose = false;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || /\d/.test(m[2]) !== ordered) break;
    const indent = m[0].length || m[1].length + m[2].length + 1;
    const body = [lines[i].slice(m[0].length)];
    i++;
    let blank = false;
    while (i < lines.length) {
      const l = lines[i];
      if (!l.trim()) {
        blank = true;
        body.push("");
        i++;
        continue;
      }
      const lead = l.length - l.trimStart().length;
      if (lead >= Math.min(indent, 4)) body.push(l.slice(Math.min(lead, indent)));
      else if (!blank && !isBlockStart(l, lines[i + 1])) body.push(l.trim()); // a lazy continuation
      else break;
      blank = false;
      i++;
    }
    while (body.length && !body[body.length - 1].trim()) {
      body.pop();
      loose = loose || (i < lines.length && ITEM.test(lines[i]));
    }
    const li = el("li");
    const task = /^\[([ xX])\][ \t]+/.exec(body[0]);
    if (task) {
      const box = el("input");
      box.type = "checkbox";
      box.disabled = true;
      box.checked = task[1] !== " ";
      li.append(box, " ");
      body[0] = body[0].slice(task[0].length);
    }
    blocks(body, li);
    node.append(li);
  }
  if (!loose) {
    for (const li of node.children) {  // tight list: items hold their text, not paragraphs
      for (const p of [...li.children]) if (p.tagName === "P") p.replaceWith(...p.childNodes);
    }
  }
  parent.append(node);
  return i;
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const out = [];
  let cur = "";
  for (let k = 0; k < s.length; k++) {
    if (s[k] === "\\" && s[k + 1] === "|") {
      cur += "|";
      k++;
    } else if (s[k] === "|") {
      out.push(cur.trim());
      cur = "";
    } else cur += s[k];
  }
  out.push(cur.trim());
  return out;
}

function table(lines, i, parent) {
  const head = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
  const wrap = el("div", "table-wrap");
  const t = el("table");
  const row = (values, tag) => {
    const tr = el("tr");
    head.forEach((_, k) => {
      const cell = el(tag);
      if (aligns[k]) cell.style.textAlign = aligns[k];
      inline(values[k] || "", cell);
      tr.append(cell);
    });
    return tr;
  };
  const thead = el("thead");
  thead.append(row(head, "th"));
  const tbody = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) tbody.append(row(cells(lines[i++]), "td"));
  t.append(thead, tbody);
  wrap.append(t);
  parent.append(wrap);
  return i;
}

export function codeBlock(code, lang) {
  const figure = el("figure", "code");
  const bar = el("figcaption");
  const label = el("span", "lang");
  label.textContent = lang || "text";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy code");
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(() => {
      copy.textContent = "Copied";
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    }, () => (copy.textContent = "Copy failed"));
  });
  bar.append(label, copy);
  const pre = el("pre");
  const c = el("code");
  if (lang) c.dataset.lang = lang;
  c.append(highlight(code, lang));
  pre.append(c);
  figure.append(bar, pre);
  return figure;
}

// Inline spans, earliest match first; ties go to the pattern listed first.
const INLINE = [
  ["code", /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g],
  ["escape", /\\([!-/:-@[-`{-~])/g],
  ["image", /!\[([^\]\n]*)\]\(\s*<?([^\s)>]*)>?(?:\s+"[^"\n]*")?\s*\)/g],
  ["link", /\[((?:[^\]\n]|\][^(])*)\]\(\s*<?([^\s)>]*)>?(?:\s+"[^"\n]*")?\s*\)/g],
  ["autolink", /<((?:https?:\/\/|mailto:)[^\s<>]+)>/g],
  ["url", /\bhttps?:\/\/[^\s<>()]*[^\s<>().,;:!?'"]/g],
  ["strong", /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])/g],
  ["del", /~~(?=\S)([\s\S]*?\S)~~/g],
  ["em", /\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/g],
  ["br", /\n/g],
];

export function inline(text, parent) {
  let pos = 0;
  while (pos < text.length) {
    let best = null;
    for (const [kind, re] of INLINE) {
      re.lastIndex = pos;
      const m = re.exec(text);
      if (m && (!best || m.index < best.m.index)) best = { kind, m };
    }
    if (!best) break;
    const { kind, m } = best;
    if (m.index > pos) parent.append(text.slice(pos, m.index));
    parent.append(span(kind, m));
    pos = m.index + m[0].length;
  }
  if (pos < text.length) parent.append(text.slice(pos));
}

function span(kind, m) {
  switch (kind) {
    case "code": {
      const c = el("code");
      const body = m[2];
      c.textContent = /^ .*[^ ].* $/s.test(body) ? body.slice(1, -1) : body;
      return c;
    }
    case "escape":
      return document.createTextNode(m[1]);
    case "br":
      return el("br");
    case "image":
    case "link": {
      const href = safeHref(m[2]);
      const label = kind === "image" ? m[1] || m[2] : m[1];
      if (!href) return document.createTextNode(m[0]);
      const a = el("a");
      a.href = href;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      if (kind === "image") {
        a.className = "image-link";
        a.title = "image (not loaded): " + href;
        a.textContent = "🖼 " + label;
      } else inline(label, a);
      return a;
    }
    case "autolink":
    case "url": {
      const href = safeHref(kind === "url" ? m[0] : m[1]);
      const a = el("a");
      a.href = href;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      a.textContent = kind === "url" ? m[0] : m[1];
      return a;
    }
    default: {
      const node = el(kind === "strong" ? "strong" : kind === "del" ? "del" : "em");
      inline(m[1] ?? m[2], node);
      return node;
    }
  }
}

// Splits "[THINK]reasoning[/THINK]answer" (Magistral-style reasoning as the engine shows it) into
// parts; a [THINK] not closed yet (still streaming) holds the rest.
export function splitThinking(text) {
  const parts = [];
  let rest = text;
  for (;;) {
    const open = rest.indexOf("[THINK]");
    if (open < 0) break;
    if (open > 0) parts.push({ kind: "answer", text: rest.slice(0, open) });
    const close = rest.indexOf("[/THINK]", open);
    if (close < 0) {
      parts.push({ kind: "think", text: rest.slice(open + 7), open: true });
      return parts;
    }
    parts.push({ kind: "think", text: rest.slice(open + 7, close), open: false });
    rest = rest.slice(close + 8);
  }
  if (rest) parts.push({ kind: "answer", text: rest });
  return parts;
}
