// Loaded by peer.mjs before matrix-js-sdk is imported.
//
// 1. stdout belongs to the JSON-lines protocol. matrix-js-sdk (through loglevel) and the Rust crypto
//    log with console.log/info/debug; route every console method to stderr so nothing but protocol
//    lines ever reaches stdout. loglevel binds console methods when it is first configured, which is
//    why this has to run before the SDK is loaded.
// 2. matrix-js-sdk 43 declares node >= 22 and calls Promise.withResolvers (ES2024), which Node 20
//    lacks. Provide it when missing.

const toStderr = (...args) => console.error(...args);
console.log = toStderr;
console.info = toStderr;
console.debug = toStderr;
console.warn = toStderr;
console.trace = toStderr;

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
