// Syntax colouring for code blocks: a small lexer per language family, output as text nodes in
// <span class="tok-KIND">. Model output is untrusted: nothing here parses HTML.

const words = (s) => new Set(s.split(" "));

const C_LIKE = {
  line: ["//"], block: ["/*", "*/"], quotes: ['"', "'"],
  keywords: words("if else for while do switch case default break continue return goto struct union enum " +
    "typedef static const extern sizeof void int char float double long short unsigned signed bool auto " +
    "class public private protected new delete this virtual override namespace using template typename try " +
    "catch throw final package import interface extends implements func go defer chan map range var type " +
    "fn let mut impl trait pub use mod crate self Self match where as move ref dyn loop async await " +
    "unsafe static_assert include define"),
  literals: words("true false null nullptr NULL nil None"),
};

const LANGS = {
  python: {
    line: ["#"], quotes: ['"""', "'''", '"', "'"], prefixes: "rbfuRBFU",
    keywords: words("and as assert async await break class continue def del elif else except finally for from " +
      "global if import in is lambda nonlocal not or pass raise return try while with yield match case"),
    literals: words("True False None self cls"),
    decorators: true,
  },
  javascript: {
    line: ["//"], block: ["/*", "*/"], quotes: ["`", '"', "'"],
    keywords: words("async await break case catch class const continue debugger default delete do else export " +
      "extends finally for from function if import in instanceof let new of return static super switch this " +
      "throw try typeof var void while with yield interface type enum implements readonly as declare"),
    literals: words("true false null undefined NaN Infinity"),
  },
  json: { quotes: ['"'], keywords: words(""), literals: words("true false null") },
  shell: {
    line: ["#"], quotes: ['"', "'"], variables: true,
    keywords: words("if then else elif fi for in do done while until case esac function return local export " +
      "readonly set unset source echo cd exit shift"),
    literals: words("true false"),
  },
  yaml: { line: ["#"], quotes: ['"', "'"], keywords: words(""), literals: words("true false null yes no ~") },
  sql: {
    line: ["--"], block: ["/*", "*/"], quotes: ["'", '"'], caseless: true,
    keywords: words("select from where and or not insert into values update set delete create table drop alter " +
      "index join left right inner outer on group by order having limit offset as distinct union all primary " +
      "key foreign references default is in like between case when then else end with returning"),
    literals: words("null true false"),
  },
  c: C_LIKE,
};

const ALIASES = {
  py: "python", python3: "python", js: "javascript", jsx: "javascript", ts: "javascript", tsx: "javascript",
  typescript: "javascript", mjs: "javascript", node: "javascript", sh: "shell", bash: "shell", zsh: "shell",
  console: "shell", yml: "yaml", toml: "yaml", ini: "yaml", jsonc: "javascript", json5: "javascript",
  cpp: "c", "c++": "c", cc: "c", h: "c", hpp: "c", java: "c", go: "c", golang: "c", rust: "c", rs: "c",
  cs: "c", csharp: "c", kotlin: "c", kt: "c", swift: "c", scala: "c", php: "c", dart: "c", zig: "c",
};

export function languageOf(name) {
  const key = (name || "").trim().toLowerCase();
  if (key === "diff" || key === "patch") return "diff";
  return LANGS[key] ? key : ALIASES[key] || null;
}

const IDENT = /[A-Za-z_$][\w$]*/y;
const NUMBER = /(?:0[xX][\da-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)[a-zA-Z]*/y;

// [kind, text] pairs covering `code` exactly (kind null for plain text).
export function tokenize(code, lang) {
  const name = languageOf(lang);
  if (name === "diff") return diffTokens(code);
  const spec = name && LANGS[name];
  if (!spec) return [[null, code]];
  const out = [];
  const push = (kind, text) => {
    const last = out[out.length - 1];
    if (last && last[0] === kind) last[1] += text;
    else out.push([kind, text]);
  };
  let i = 0;
  while (i < code.length) {
    const rest = (s) => code.startsWith(s, i);
    const lineComment = (spec.line || []).find(rest);
    if (lineComment && !(name === "shell" && i > 0 && /[\w$]/.test(code[i - 1]))) {
      const end = code.indexOf("\n", i);
      const stop = end < 0 ? code.length : end;
      push("comment", code.slice(i, stop));
      i = stop;
      continue;
    }
    if (spec.block && rest(spec.block[0])) {
      const end = code.indexOf(spec.block[1], i + spec.block[0].length);
      const stop = end < 0 ? code.length : end + spec.block[1].length;
      push("comment", code.slice(i, stop));
      i = stop;
      continue;
    }
    let start = i;
    if (spec.prefixes && spec.prefixes.includes(code[i]) && /["']/.test(code[i + 1] || "")) start = i + 1;
    const quote = spec.quotes.find((q) => code.startsWith(q, start));
    if (quote) {
      let j = start + quote.length;
      while (j < code.length && !code.startsWith(quote, j)) {
        if (code[j] === "\\") j++;
        else if (code[j] === "\n" && quote.length === 1 && quote !== "`") break;
        j++;
      }
      const stop = Math.min(code.length, j + (code.startsWith(quote, j) ? quote.length : 0));
      push(name === "json" && /^\s*:/.test(code.slice(stop, stop + 8)) ? "property" : "string", code.slice(i, stop));
      i = stop;
      continue;
    }
    if (spec.decorators && code[i] === "@" && (i === 0 || code[i - 1] === "\n" || /\s/.test(code[i - 1]))) {
      IDENT.lastIndex = i + 1;
      const m = IDENT.exec(code);
      if (m) {
        push("meta", "@" + m[0]);
        i += 1 + m[0].length;
        continue;
      }
    }
    if (spec.variables && code[i] === "$") {
      const m = /\$(?:\{[^}\n]*\}|[\w@#?*!$-]+)/y;
      m.lastIndex = i;
      const found = m.exec(code);
      if (found) {
        push("variable", found[0]);
        i += found[0].length;
        continue;
      }
    }
    if (/\d/.test(code[i]) || (code[i] === "." && /\d/.test(code[i + 1] || ""))) {
      if (i === 0 || !/[\w$]/.test(code[i - 1])) {
        NUMBER.lastIndex = i;
        const m = NUMBER.exec(code);
        if (m) {
          push("number", m[0]);
          i += m[0].length;
          continue;
        }
      }
    }
    IDENT.lastIndex = i;
    const ident = IDENT.exec(code);
    if (ident) {
      const word = ident[0];
      const key = spec.caseless ? word.toLowerCase() : word;
      let kind = null;
      if (spec.keywords.has(key)) kind = "keyword";
      else if (spec.literals.has(key)) kind = "literal";
      else if (code[i + word.length] === "(") kind = "function";
      push(kind, word);
      i += word.length;
      continue;
    }
    push(null, code[i]);
    i++;
  }
  return out;
}

function diffTokens(code) {
  return code.split(/(?<=\n)/).map((line) => {
    if (/^(\+\+\+|---)/.test(line)) return ["meta", line];
    if (line.startsWith("+")) return ["inserted", line];
    if (line.startsWith("-")) return ["deleted", line];
    if (line.startsWith("@@")) return ["meta", line];
    return [null, line];
  });
}

// A DocumentFragment of the coloured code.
export function highlight(code, lang) {
  const frag = document.createDocumentFragment();
  for (const [kind, text] of tokenize(code, lang)) {
    if (!kind) {
      frag.append(text);
      continue;
    }
    const span = document.createElement("span");
    span.className = "tok-" + kind;
    span.textContent = text;
    frag.append(span);
  }
  return frag;
}
