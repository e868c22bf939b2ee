// Loaded by peer.mjs before matrix-js-sdk is imported.
//
// 1. stdout belongs to the JSON-lines protocol. matrix-js-sdk (through loglevel) and the Rust crypto
//    log with console.log/info/debug; route every console method to stderr so nothing but protocol
//    lines ever reaches stdout. This runs before the SDK is loaded so that nothing can capture the
//    original console methods first.
// 2. matrix-js-sdk 43 declares node >= 22 and calls Promise.withResolvers (ES2024), which Node 20
//    lacks. Provide it when missing.

// PEER_LOG_LEVEL (debug | info | warn | error, default info) filters the SDK's console output.
const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 };
const threshold = LEVELS[(process.env.PEER_LOG_LEVEL || "info").toLowerCase()] ?? LEVELS.info;
const toStderr = console.error.bind(console);
const atLevel = (level, prefix) =>
    LEVELS[level] >= threshold ? (...args) => toStderr(prefix, ...args) : () => {};
console.trace = atLevel("debug", "TRACE");
console.debug = atLevel("debug", "DEBUG");
console.log = atLevel("info", "INFO ");
console.info = atLevel("info", "INFO ");
console.warn = atLevel("warn", "WARN ");
console.error = (...args) => toStderr("ERROR", ...args);

if (typeof Promise.withResolvers !== "function") {
    Object.defineProperty(Promise, "withResolvers", {
        configurable: true,
        writable: true,
        enumerable: false,
        value: function withResolvers() {
            let resolve;
            let reject;
            const promise = new this((res, rej) => {
                resolve = res;
                reject = rej;
            });
            return { promise, resolve, reject };
        },
    });
}
