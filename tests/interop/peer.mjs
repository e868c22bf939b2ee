// Interop test peer: matrix-js-sdk (with its Rust crypto, the engine inside Element) driven over
// JSON lines, for bot_toolkit's tests. See tests/interop_peer.py for the Python driver.
//
// Protocol (stdin -> stdout, one JSON object per line):
//   command:      {"id": N, "cmd": "<name>", ...args}
//   reply:        {"id": N, "ok": true, ...result}  or  {"id": N, "ok": false, "error": "..."}
//   notification: {"event": "<name>", ...fields}   (no "id")
// Commands run concurrently; replies can come back out of order. Every waiting command takes
// "timeout" in seconds. Logs go to stderr only. The process exits when stdin closes or on "stop".
//
// Commands (arguments; "timeout" accepted by every waiting one):
//   ping, version, stop
//   login {homeserver, user_id, access_token, device_id}
//   start {timeout, auto_verify?}        init Rust crypto in memory, start sync, wait for first sync
//   own_keys, set_options {auto_verify}
//   create_room {invite?, encrypted?=true, name?} -> room_id; invite {room_id, user_id};
//   join {room_id}; enable_encryption {room_id}; wait_membership {room_id, user_id?, membership?};
//   send_text {room_id, body}
//   devices {user_id, device_id?, wait?}  the crypto's view; download_keys {user_id|user_ids, device_id?}
//   device_status {user_id, device_id}; set_device_verified {user_id, device_id, verified?}
//   request_verification {user_id, device_id}; wait_request {user_id?, device_id?};
//   request_verification_dm {user_id, room_id}; user_verification_status {user_id};
//   send_room_event {room_id, type, content}; cross_sign_device {device_id};
//   accept_request / start_sas / accept_sas / wait_sas / confirm_sas / mismatch_sas /
//   request_info {transaction_id}; wait_phase {transaction_id, phase}; cancel {transaction_id, code?, reason?}
//   list_requests; auto_accept {enabled?, confirm?=true, mismatch?, start?, delay_ms?, user_id?, device_id?}
//   send_to_device {type, messages | user_id+device_id+content, txn_id?}
//   send_encrypted_to_device {type, devices | user_id+device_id, content, txn_id?}
//   identity (cross-signing, secret storage):
//   user_identity {user_id}             userHasCrossSigningKeys (downloading) + their master key
//   cross_signing_status                 our own: status, master key id, isCrossSigningReady
//   set_recovery_key {recovery_key}      the secret storage key getSecretStorageKey answers with
//   bootstrap_cross_signing {password?, reset?}  bootstrapCrossSigning (UIA with the password if asked;
//                                        reset: a new identity even if one exists)
//   create_secret_storage                new default SSSS key + keys in it; returns recovery_key
//   set_isolation_mode {mode: "only_signed"|"all"}; encryption_info {room_id, event_id}
//   room_messages {room_id}              decrypted timeline events seen (room_event notifications)
// Notifications: ready, sync, room_event, verification_request, verification_phase, sas, verification_done,
//   verification_cancelled, verifier_cancelled, auto_error, to_device, protocol_error, fatal.
//
// Only loopback homeservers are accepted (127.0.0.1, ::1, localhost), and every HTTP request the
// SDK makes is checked against that.

import "./polyfill.mjs";
import readline from "node:readline";

const DEFAULT_TIMEOUT = 30;
const PHASES = { 1: "unsent", 2: "requested", 3: "ready", 4: "started", 5: "cancelled", 6: "done" };
const PHASE_ORDER = { unsent: 1, requested: 2, ready: 3, started: 4, done: 6 };
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);

let sdk; // matrix-js-sdk module
let cryptoApiMod; // matrix-js-sdk/lib/crypto-api
let wasm; // @matrix-org/matrix-sdk-crypto-wasm (same instance the SDK uses)

let client = null;
let crypto = null;
/** the secret storage key (Uint8Array) getSecretStorageKey answers with, or null */
let secretStorageKey = null;
/** room id -> [MatrixEvent] seen in the timeline (for encryption_info / room_messages) */
const roomEvents = new Map();
let syncState = null;
let syncError = null;
let shuttingDown = false;

/** transaction id -> entry; see track() */
const requests = new Map();
/** auto mode for incoming requests, or null; see cmd auto_accept */
let autoMode = null;
/** call verifier.verify() as soon as a verifier exists (Element does this once the SAS dialog shows) */
let autoVerify = true;

// ---------------------------------------------------------------------------------------------
// output

function emit(obj) {
    process.stdout.write(JSON.stringify(obj) + "\n");
}

function plog(...args) {
    process.stderr.write(`[peer ${new Date().toISOString()}] ${args.join(" ")}\n`);
}

function errText(e) {
    if (e === undefined || e === null) return String(e);
    if (e instanceof Error) {
        const extra = e.errcode ? ` (${e.errcode}${e.httpStatus ? ` ${e.httpStatus}` : ""})` : "";
        return `${e.name}: ${e.message}${extra}`;
    }
    if (typeof e === "object" && typeof e.getType === "function") {
        // a MatrixEvent, e.g. the cancel event handed to VerifierEvent.Cancel
        return `event ${e.getType()} ${JSON.stringify(e.getContent())}`;
    }
    return String(e);
}

// ---------------------------------------------------------------------------------------------
// waiting

const waiters = new Set();

/** Re-run every pending waitFor() check (called whenever something interesting changes). */
function bump() {
    for (const w of [...waiters]) w.check();
}

/**
 * Resolve with the first value other than undefined that check() returns; check() is re-run on
 * every bump() and every 200 ms. Rejects when check() throws or after timeoutS seconds.
 */
function waitFor(what, timeoutS, check) {
    const timeout = Number(timeoutS ?? DEFAULT_TIMEOUT);
    return new Promise((resolve, reject) => {
        let finished = false;
        let running = false;
        let rerun = false;
        const w = {
            check: async () => {
                if (finished) return;
                if (running) {
                    rerun = true;
                    return;
                }
                running = true;
                try {
                    do {
                        rerun = false;
                        const value = await check();
                        if (value !== undefined && !finished) {
                            finish();
                            resolve(value);
                        }
                    } while (rerun && !finished);
                } catch (e) {
                    if (!finished) {
                        finish();
                        reject(e);
                    }
                } finally {
                    running = false;
                }
            },
        };
        const timer = setTimeout(() => {
            if (!finished) {
                finish();
                reject(new Error(`timeout after ${timeout}s waiting for ${what}`));
            }
        }, timeout * 1000);
        const poll = setInterval(() => w.check(), 200);
        function finish() {
            finished = true;
            clearTimeout(timer);
            clearInterval(poll);
            waiters.delete(w);
        }
        waiters.add(w);
        w.check();
    });
}

function withTimeout(promise, timeoutS, what) {
    const timeout = Number(timeoutS ?? DEFAULT_TIMEOUT);
    let timer;
    return Promise.race([
        promise,
        new Promise((_, reject) => {
            timer = setTimeout(() => reject(new Error(`timeout after ${timeout}s: ${what}`)), timeout * 1000);
        }),
    ]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// helpers

function requireArg(args, name) {
    const v = args[name];
    if (v === undefined || v === null || v === "") throw new Error(`missing argument "${name}"`);
    return v;
}

function requireClient() {
    if (!client) throw new Error("not logged in (send login first)");
    return client;
}

function requireCrypto() {
    if (!crypto) throw new Error("crypto not started (send start first)");
    return crypto;
}

function checkLoopback(url) {
    const u = new URL(url);
    if (!LOOPBACK.has(u.hostname)) throw new Error(`refusing non-loopback URL ${u.origin}`);
    return u;
}

/** fetch() that only talks to loopback addresses. */
function loopbackFetch(input, init) {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    checkLoopback(url);
    return fetch(input, init);
}

function phaseName(p) {
    return PHASES[p] ?? `unknown(${p})`;
}

function requestInfo(e) {
    const r = e.req;
    return {
        transaction_id: e.key,
        other_user: r.otherUserId,
        other_device: r.otherDeviceId ?? null,
        initiated_by_me: r.initiatedByMe,
        phase: phaseName(r.phase),
        their_methods: theirMethods(r),
        chosen_method: r.chosenMethod ?? null,
        cancellation_code: r.cancellationCode ?? null,
        cancelling_user: r.cancellingUserId ?? null,
        sas: e.sas,
        verify_result: e.verifyResult,
    };
}

const KNOWN_METHODS = ["m.sas.v1", "m.qr_code.scan.v1", "m.qr_code.show.v1", "m.reciprocate.v1"];

/** Methods the other side advertised (VerificationRequest.methods throws "not implemented" in the Rust crypto). */
function theirMethods(r) {
    return KNOWN_METHODS.filter((m) => {
        try {
            return r.otherPartySupportsMethod(m);
        } catch {
            return false;
        }
    });
}

function getEntry(args) {
    const txn = requireArg(args, "transaction_id");
    const e = requests.get(txn);
    if (!e) throw new Error(`unknown verification request ${txn}`);
    return e;
}

function deviceToJson(d) {
    return {
        device_id: d.deviceId,
        user_id: d.userId,
        display_name: d.displayName ?? null,
        ed25519: d.getFingerprint?.() ?? null,
        curve25519: d.getIdentityKey?.() ?? null,
        algorithms: d.algorithms ?? [],
        verified: d.verified,
    };
}

/** The Rust crypto's own view of a user's devices (only meaningful for tracked users). */
async function knownDevices(userId) {
    const map = await requireCrypto().getUserDeviceInfo([userId], false);
    const devices = map.get(userId);
    return devices ? [...devices.values()] : [];
}

function eventToJson(e) {
    return {
        room_id: e.getRoomId(),
        event_id: e.getId(),
        sender: e.getSender(),
        type: e.getType(),
        encrypted: e.isEncrypted(),
        decryption_failure: e.isDecryptionFailure() ? (e.decryptionFailureReason ?? "unknown") : null,
        body: e.isDecryptionFailure() ? null : (e.getContent()?.body ?? null),
    };
}

// ---------------------------------------------------------------------------------------------
// verification tracking

/**
 * Start following a verification request: emits verification_* events, hooks its verifier,
 * and drives it when auto mode applies.
 */
function track(req, incoming) {
    const key = req.transactionId;
    if (!key) throw new Error("verification request has no transaction id");
    let e = requests.get(key);
    if (e) return e;
    e = {
        key,
        req,
        incoming,
        claimed: false,
        lastPhase: null,
        verifier: null,
        verifyCalled: false,
        verifyResult: null,
        sas: null,
        sasCallbacks: null,
        auto: null,
        autoState: { accepting: false, starting: false, answered: false },
    };
    if (incoming && autoMode && autoMatches(autoMode, req)) e.auto = { ...autoMode };
    requests.set(key, e);
    req.on(cryptoApiMod.VerificationRequestEvent.Change, () => onRequestChange(e));
    onRequestChange(e);
    return e;
}

function autoMatches(mode, req) {
    if (mode.user_id && mode.user_id !== req.otherUserId) return false;
    if (mode.device_id && mode.device_id !== req.otherDeviceId) return false;
    return true;
}

function onRequestChange(e) {
    const req = e.req;
    const phase = phaseName(req.phase);
    if (phase !== e.lastPhase) {
        e.lastPhase = phase;
        const base = { transaction_id: e.key, other_user: req.otherUserId, other_device: req.otherDeviceId ?? null };
        emit({ event: "verification_phase", ...base, phase, initiated_by_me: req.initiatedByMe });
        if (phase === "done") emit({ event: "verification_done", ...base });
        if (phase === "cancelled") {
            emit({
                event: "verification_cancelled",
                ...base,
                code: req.cancellationCode ?? null,
                cancelling_user: req.cancellingUserId ?? null,
            });
        }
    }
    if (req.verifier && !e.verifier) hookVerifier(e, req.verifier);
    if (e.auto) driveAuto(e);
    bump();
}

function hookVerifier(e, verifier) {
    if (e.verifier) return;
    e.verifier = verifier;
    const { VerifierEvent } = cryptoApiMod;
    verifier.on(VerifierEvent.ShowSas, (callbacks) => onShowSas(e, callbacks));
    verifier.on(VerifierEvent.Cancel, (err) => {
        emit({ event: "verifier_cancelled", transaction_id: e.key, error: errText(err) });
        bump();
    });
    const existing = verifier.getShowSasCallbacks?.();
    if (existing) onShowSas(e, existing);
    if (autoVerify || e.auto) runVerify(e);
}

function onShowSas(e, callbacks) {
    if (e.sasCallbacks) return;
    e.sasCallbacks = callbacks;
    e.sas = { emoji: callbacks.sas.emoji ?? null, decimal: callbacks.sas.decimal ?? null };
    emit({
        event: "sas",
        transaction_id: e.key,
        other_user: e.req.otherUserId,
        other_device: e.req.otherDeviceId ?? null,
        emoji: e.sas.emoji,
        decimal: e.sas.decimal,
    });
    if (e.auto) autoAnswerSas(e);
    bump();
}

/** verifier.verify(): sends accept (for the side that did not start) and resolves when done. */
function runVerify(e) {
    if (e.verifyCalled || !e.verifier) return;
    e.verifyCalled = true;
    e.verifier.verify().then(
        () => {
            e.verifyResult = "ok";
            bump();
        },
        (err) => {
            e.verifyResult = errText(err);
            plog(`verify() for ${e.key} ended with ${e.verifyResult}`);
            bump();
        },
    );
}

function autoError(e, step, err) {
    plog(`auto ${step} for ${e.key} failed: ${errText(err)}`);
    emit({ event: "auto_error", transaction_id: e.key, step, error: errText(err) });
}

function driveAuto(e) {
    const req = e.req;
    const st = e.autoState;
    if (req.phase === 2 /* requested */ && !req.initiatedByMe && !st.accepting) {
        st.accepting = true;
        delayed(e.auto.delay_ms, () => req.accept()).catch((err) => autoError(e, "accept", err));
    }
    if (req.phase === 3 /* ready */ && e.auto.start && !st.starting) {
        st.starting = true;
        delayed(e.auto.delay_ms, () => req.startVerification("m.sas.v1"))
            .then((v) => {
                hookVerifier(e, v);
                runVerify(e);
            })
            .catch((err) => autoError(e, "start", err));
    }
}

function autoAnswerSas(e) {
    const st = e.autoState;
    if (st.answered || !e.sasCallbacks) return;
    if (e.auto.mismatch) {
        st.answered = true;
        delayed(e.auto.delay_ms, () => e.sasCallbacks.mismatch()).catch((err) => autoError(e, "mismatch", err));
    } else if (e.auto.confirm) {
        st.answered = true;
        delayed(e.auto.delay_ms, () => e.sasCallbacks.confirm()).catch((err) => autoError(e, "confirm", err));
    }
}

function delayed(ms, fn) {
    const d = Number(ms || 0);
    if (d <= 0) return Promise.resolve().then(fn);
    return new Promise((resolve) => setTimeout(resolve, d)).then(fn);
}

// ---------------------------------------------------------------------------------------------
// commands

const commands = {
    async ping() {
        return { pong: true };
    },

    async version() {
        return {
            sdk: sdkVersion,
            crypto: crypto ? crypto.getVersion() : null,
            node: process.version,
        };
    },

    async login(args) {
        if (client) throw new Error("already logged in");
        const homeserver = requireArg(args, "homeserver");
        checkLoopback(homeserver);
        client = sdk.createClient({
            baseUrl: homeserver,
            userId: requireArg(args, "user_id"),
            accessToken: requireArg(args, "access_token"),
            deviceId: requireArg(args, "device_id"),
            fetchFn: loopbackFetch,
            timelineSupport: false,
            cryptoCallbacks: {
                getSecretStorageKey: async ({ keys }) => {
                    if (!secretStorageKey) return null;
                    const keyId = Object.keys(keys)[0];
                    return keyId ? [keyId, secretStorageKey] : null;
                },
            },
        });
        return { user_id: client.getUserId(), device_id: client.getDeviceId() };
    },

    async start(args) {
        const c = requireClient();
        if (crypto) throw new Error("already started");
        const timeout = args.timeout ?? DEFAULT_TIMEOUT;
        if (args.auto_verify !== undefined) autoVerify = Boolean(args.auto_verify);
        await withTimeout(c.initRustCrypto({ useIndexedDB: false }), timeout, "initRustCrypto");
        crypto = c.getCrypto();
        const { CryptoEvent } = cryptoApiMod;
        c.on(CryptoEvent.VerificationRequestReceived, (req) => {
            try {
                const e = track(req, true);
                emit({ event: "verification_request", ...requestInfo(e) });
            } catch (err) {
                plog(`incoming verification request not tracked: ${errText(err)}`);
            }
            bump();
        });
        c.on(sdk.ClientEvent.ReceivedToDeviceMessage, (payload) => {
            const m = payload.message;
            const info = payload.encryptionInfo;
            emit({
                event: "to_device",
                type: m.type,
                sender: m.sender,
                content: m.content,
                encrypted: Boolean(info),
                sender_device: info?.senderDevice ?? null,
                sender_curve25519: info?.senderCurve25519KeyBase64 ?? null,
                sender_verified: info?.senderVerified ?? null,
            });
            bump();
        });
        c.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
            if (state !== syncState) emit({ event: "sync", state });
            syncState = state;
            syncError = data?.error ? errText(data.error) : null;
            bump();
        });
        c.on(sdk.RoomEvent.Timeline, (event, room) => {
            if (!room) return;
            const list = roomEvents.get(room.roomId) ?? [];
            list.push(event);
            roomEvents.set(room.roomId, list);
            const report = () => {
                emit({ event: "room_event", ...eventToJson(event) });
                bump();
            };
            if (event.isBeingDecrypted() || event.shouldAttemptDecryption?.()) {
                event.once(sdk.MatrixEventEvent.Decrypted, report);
            } else {
                report();
            }
        });
        c.on(sdk.RoomMemberEvent.Membership, () => bump());
        c.on(sdk.RoomEvent.MyMembership, () => bump());
        await c.startClient({ initialSyncLimit: 1, lazyLoadMembers: false });
        await waitFor(`first sync (last state ${syncState}${syncError ? `, ${syncError}` : ""})`, timeout, () =>
            syncState === "PREPARED" || syncState === "SYNCING" ? true : undefined,
        );
        const keys = await crypto.getOwnDeviceKeys();
        return {
            user_id: c.getUserId(),
            device_id: c.getDeviceId(),
            ed25519: keys.ed25519,
            curve25519: keys.curve25519,
            crypto: crypto.getVersion(),
        };
    },

    async own_keys() {
        const keys = await requireCrypto().getOwnDeviceKeys();
        return { user_id: client.getUserId(), device_id: client.getDeviceId(), ed25519: keys.ed25519, curve25519: keys.curve25519 };
    },

    async set_options(args) {
        if (args.auto_verify !== undefined) autoVerify = Boolean(args.auto_verify);
        return { auto_verify: autoVerify };
    },

    // --- rooms ----------------------------------------------------------------------------

    async create_room(args) {
        const c = requireClient();
        const invite = args.invite ?? [];
        const initialState = [];
        if (args.encrypted ?? true) {
            initialState.push({ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } });
        }
        const res = await c.createRoom({
            preset: "private_chat",
            visibility: "private",
            invite,
            name: args.name,
            initial_state: initialState,
        });
        return { room_id: res.room_id };
    },

    async invite(args) {
        await requireClient().invite(requireArg(args, "room_id"), requireArg(args, "user_id"));
        return {};
    },

    async join(args) {
        const roomId = requireArg(args, "room_id");
        const c = requireClient();
        await withTimeout(c.joinRoom(roomId), args.timeout, `join ${roomId}`);
        return { room_id: roomId };
    },

    async enable_encryption(args) {
        const roomId = requireArg(args, "room_id");
        await requireClient().sendStateEvent(roomId, "m.room.encryption", { algorithm: "m.megolm.v1.aes-sha2" }, "");
        return { room_id: roomId };
    },

    /** Wait until this client's sync shows user_id (default: self) with the membership (default "join"). */
    async wait_membership(args) {
        const c = requireClient();
        const roomId = requireArg(args, "room_id");
        const userId = args.user_id ?? c.getUserId();
        const membership = args.membership ?? "join";
        await waitFor(`${userId} ${membership} in ${roomId}`, args.timeout, () => {
            const room = c.getRoom(roomId);
            const member = room?.getMember(userId);
            return member?.membership === membership ? true : undefined;
        });
        return {};
    },

    async send_text(args) {
        const res = await requireClient().sendTextMessage(requireArg(args, "room_id"), args.body ?? "hello");
        return { event_id: res.event_id };
    },

    // --- devices --------------------------------------------------------------------------

    /**
     * The Rust crypto's view of a user's devices. With wait: true, wait until device_id (or any
     * device) is known: this does NOT make the SDK track the user (use download_keys for that).
     */
    async devices(args) {
        const userId = requireArg(args, "user_id");
        requireCrypto();
        const want = args.device_id;
        const found = async () => {
            const list = await knownDevices(userId);
            if (want ? list.some((d) => d.deviceId === want) : list.length > 0) return list;
            return undefined;
        };
        const list = args.wait ? await waitFor(`devices of ${userId}`, args.timeout, found) : await knownDevices(userId);
        return { devices: list.map(deviceToJson) };
    },

    /**
     * Make the Rust crypto track user_id (as a shared encrypted room would) and query its keys;
     * with device_id, repeat the query (every 500 ms) until that device is known. Without this
     * (or a shared room) the SDK silently ignores verification requests from the user's devices.
     * The repetition matters: with no shared room, the homeserver never tells this client that a
     * device appeared later, so one query made before the device uploaded its keys is final.
     */
    async download_keys(args) {
        const c = requireCrypto();
        const userIds = args.user_ids ?? [requireArg(args, "user_id")];
        const want = userIds.length === 1 ? args.device_id : undefined;
        const machine = c.olmMachine;
        const processor = c.outgoingRequestProcessor;
        if (typeof machine?.updateTrackedUsers !== "function" || typeof processor?.makeOutgoingRequest !== "function") {
            throw new Error("this matrix-js-sdk has no reachable olmMachine / outgoingRequestProcessor");
        }
        await machine.updateTrackedUsers(userIds.map((u) => new wasm.UserId(u)));
        const timeout = Number(args.timeout ?? DEFAULT_TIMEOUT);
        const deadline = Date.now() + timeout * 1000;
        const result = {};
        const pending = new Set(userIds);
        for (;;) {
            // An out-of-band /keys/query whose answer goes into the crypto store.
            const request = machine.queryKeysForUsers([...pending].map((u) => new wasm.UserId(u)));
            await withTimeout(processor.makeOutgoingRequest(request), Math.max(1, (deadline - Date.now()) / 1000), "/keys/query");
            for (const userId of [...pending]) {
                const devices = await knownDevices(userId);
                if (want ? devices.some((d) => d.deviceId === want) : devices.length > 0) {
                    result[userId] = devices.map(deviceToJson);
                    pending.delete(userId);
                }
            }
            if (pending.size === 0) return { devices: result };
            if (Date.now() + 500 > deadline) {
                throw new Error(`timeout after ${timeout}s waiting for keys of ${[...pending].join(", ")}${want ? ` device ${want}` : ""}`);
            }
            await new Promise((resolve) => setTimeout(resolve, 500));
        }
    },

    async device_status(args) {
        const userId = requireArg(args, "user_id");
        const deviceId = requireArg(args, "device_id");
        const s = await requireCrypto().getDeviceVerificationStatus(userId, deviceId);
        if (!s) return { known: false, verified: false };
        return {
            known: true,
            verified: s.isVerified(),
            locally_verified: s.localVerified,
            cross_signing_verified: s.crossSigningVerified,
            signed_by_owner: s.signedByOwner,
            tofu: s.tofu,
        };
    },

    async set_device_verified(args) {
        await requireCrypto().setDeviceVerified(requireArg(args, "user_id"), requireArg(args, "device_id"), args.verified ?? true);
        return {};
    },

    // --- verification ---------------------------------------------------------------------

    async request_verification(args) {
        const userId = requireArg(args, "user_id");
        const deviceId = requireArg(args, "device_id");
        const req = await withTimeout(
            requireCrypto().requestDeviceVerification(userId, deviceId),
            args.timeout,
            "requestDeviceVerification",
        );
        const e = track(req, false);
        e.claimed = true;
        return requestInfo(e);
    },

    /** In-room request (as Element verifies another user): m.room.message in room_id. */
    async request_verification_dm(args) {
        const req = await withTimeout(
            requireCrypto().requestVerificationDM(requireArg(args, "user_id"), requireArg(args, "room_id")),
            args.timeout,
            "requestVerificationDM",
        );
        const e = track(req, false);
        e.claimed = true;
        return { ...requestInfo(e), room_id: req.roomId ?? null };
    },

    /** Sign one of our own devices with our self-signing key (we must hold it). */
    async cross_sign_device(args) {
        await withTimeout(requireCrypto().crossSignDevice(requireArg(args, "device_id")), args.timeout, "crossSignDevice");
        return {};
    },

    /** How this client trusts user_id's identity (Rust crypto's UserVerificationStatus). */
    async user_verification_status(args) {
        const userId = requireArg(args, "user_id");
        const s = await requireCrypto().getUserVerificationStatus(userId);
        return {
            known: s.known,
            verified: s.isVerified(),
            cross_signing_verified: s.isCrossSigningVerified(),
            was_cross_signing_verified: s.wasCrossSigningVerified(),
            needs_user_approval: s.needsUserApproval,
            has_cross_signing_keys: await requireCrypto().userHasCrossSigningKeys(userId, true),
        };
    },

    /** Send any room event (plaintext, or encrypted by the SDK in an encrypted room). */
    async send_room_event(args) {
        const res = await withTimeout(
            requireClient().sendEvent(requireArg(args, "room_id"), requireArg(args, "type"), args.content ?? {}),
            args.timeout,
            "sendEvent",
        );
        return { event_id: res.event_id };
    },

    /** Wait for an incoming request (optionally from user_id / device_id) not yet returned by wait_request. */
    async wait_request(args) {
        requireCrypto();
        const e = await waitFor(`incoming verification request from ${args.user_id ?? "anyone"}`, args.timeout, () => {
            for (const entry of requests.values()) {
                if (!entry.incoming || entry.claimed) continue;
                if (args.user_id && entry.req.otherUserId !== args.user_id) continue;
                if (args.device_id && entry.req.otherDeviceId !== args.device_id) continue;
                return entry;
            }
            return undefined;
        });
        e.claimed = true;
        return requestInfo(e);
    },

    async accept_request(args) {
        const e = getEntry(args);
        await withTimeout(e.req.accept(), args.timeout, "request.accept()");
        return requestInfo(e);
    },

    /** Wait until the request reaches phase (or a later one); fails if it is cancelled instead. */
    async wait_phase(args) {
        const e = getEntry(args);
        const want = requireArg(args, "phase");
        if (want !== "cancelled" && !(want in PHASE_ORDER)) throw new Error(`unknown phase ${want}`);
        await waitFor(`${e.key} phase ${want}`, args.timeout, () => {
            const now = phaseName(e.req.phase);
            if (now === want) return true;
            if (want === "cancelled") return undefined;
            if (now === "cancelled") {
                throw new Error(
                    `verification ${e.key} cancelled (code ${e.req.cancellationCode}, by ${e.req.cancellingUserId}) while waiting for ${want}`,
                );
            }
            return PHASE_ORDER[now] >= PHASE_ORDER[want] ? true : undefined;
        });
        return requestInfo(e);
    },

    async start_sas(args) {
        const e = getEntry(args);
        const verifier = await withTimeout(e.req.startVerification("m.sas.v1"), args.timeout, "startVerification");
        hookVerifier(e, verifier);
        runVerify(e);
        return requestInfo(e);
    },

    /** Call verifier.verify() (accepts a start from the other side) when auto_verify is off. */
    async accept_sas(args) {
        const e = getEntry(args);
        await waitFor(`${e.key} verifier`, args.timeout, () => (e.req.verifier ? true : undefined));
        hookVerifier(e, e.req.verifier);
        runVerify(e);
        return requestInfo(e);
    },

    async wait_sas(args) {
        const e = getEntry(args);
        await waitFor(`${e.key} SAS`, args.timeout, () => {
            if (e.sas) return true;
            if (e.req.phase === 5) throw new Error(`verification ${e.key} cancelled (code ${e.req.cancellationCode})`);
            return undefined;
        });
        return requestInfo(e);
    },

    async confirm_sas(args) {
        const e = getEntry(args);
        await commands.wait_sas(args);
        await withTimeout(e.sasCallbacks.confirm(), args.timeout, "SAS confirm()");
        return requestInfo(e);
    },

    async mismatch_sas(args) {
        const e = getEntry(args);
        await commands.wait_sas(args);
        e.sasCallbacks.mismatch();
        return requestInfo(e);
    },

    async cancel(args) {
        const e = getEntry(args);
        const params = {};
        if (args.code) params.code = args.code;
        if (args.reason) params.reason = args.reason;
        await withTimeout(e.req.cancel(params), args.timeout, "request.cancel()");
        return requestInfo(e);
    },

    async request_info(args) {
        return requestInfo(getEntry(args));
    },

    async list_requests() {
        return { requests: [...requests.values()].map(requestInfo) };
    },

    /**
     * Auto mode for incoming requests (and pending unanswered ones): accept; with start, send
     * the SAS start once ready; on SAS, confirm (confirm, default true) or mismatch (mismatch).
     * Optional user_id / device_id filter, delay_ms before each step. enabled: false turns it off.
     */
    async auto_accept(args) {
        if (args.enabled === false) {
            autoMode = null;
            return { enabled: false };
        }
        autoMode = {
            confirm: args.confirm ?? true,
            mismatch: args.mismatch ?? false,
            start: args.start ?? false,
            delay_ms: args.delay_ms ?? 0,
            user_id: args.user_id ?? null,
            device_id: args.device_id ?? null,
        };
        for (const e of requests.values()) {
            if (e.incoming && !e.auto && e.req.phase === 2 && autoMatches(autoMode, e.req)) {
                e.auto = { ...autoMode };
                driveAuto(e);
            }
        }
        return { enabled: true, ...autoMode };
    },

    // --- identity -------------------------------------------------------------------------

    async user_identity(args) {
        const userId = requireArg(args, "user_id");
        const has = await requireCrypto().userHasCrossSigningKeys(userId, true);
        let master = null;
        const identity = await crypto.olmMachine.getIdentity(new wasm.UserId(userId));
        if (identity) {
            const keys = JSON.parse(identity.masterKey).keys;
            master = Object.values(keys)[0] ?? null;
            identity.free?.();
        }
        return { has_keys: has, master_key: master };
    },

    async cross_signing_status() {
        const c = requireCrypto();
        const status = await c.getCrossSigningStatus();
        return {
            public_keys_on_device: status.publicKeysOnDevice,
            private_keys_in_secret_storage: status.privateKeysInSecretStorage,
            private_keys_cached: status.privateKeysCachedLocally,
            master_key: await c.getCrossSigningKeyId(),
            ready: await c.isCrossSigningReady(),
        };
    },

    async set_recovery_key(args) {
        secretStorageKey = cryptoApiMod.decodeRecoveryKey(requireArg(args, "recovery_key"));
        return {};
    },

    async bootstrap_cross_signing(args) {
        const c = requireClient();
        await withTimeout(
            requireCrypto().bootstrapCrossSigning({
                setupNewCrossSigning: Boolean(args.reset),
                authUploadDeviceSigningKeys: async (makeRequest) => {
                    if (!args.password) return makeRequest(null);
                    return makeRequest({
                        type: "m.login.password",
                        identifier: { type: "m.id.user", user: c.getUserId() },
                        password: args.password,
                    });
                },
            }),
            args.timeout,
            "bootstrapCrossSigning",
        );
        return commands.cross_signing_status();
    },

    async create_secret_storage(args) {
        const generated = await requireCrypto().createRecoveryKeyFromPassphrase();
        secretStorageKey = generated.privateKey;
        await withTimeout(
            crypto.bootstrapSecretStorage({ createSecretStorageKey: async () => generated, setupNewSecretStorage: true }),
            args.timeout,
            "bootstrapSecretStorage",
        );
        return { recovery_key: generated.encodedPrivateKey };
    },

    async set_isolation_mode(args) {
        const mode = requireArg(args, "mode");
        const m = cryptoApiMod;
        if (mode === "only_signed") requireCrypto().setDeviceIsolationMode(new m.OnlySignedDevicesIsolationMode());
        else if (mode === "all") requireCrypto().setDeviceIsolationMode(new m.AllDevicesIsolationMode(false));
        else throw new Error(`unknown isolation mode ${mode}`);
        return {};
    },

    async encryption_info(args) {
        const roomId = requireArg(args, "room_id");
        const eventId = requireArg(args, "event_id");
        const event = (roomEvents.get(roomId) ?? []).find((e) => e.getId() === eventId);
        if (!event) throw new Error(`event ${eventId} not seen in ${roomId}`);
        const info = await requireCrypto().getEncryptionInfoForEvent(event);
        const colours = { 0: "none", 1: "grey", 2: "red" };
        return {
            ...eventToJson(event),
            shield: info ? colours[info.shieldColour] : null,
            shield_reason: info?.shieldReason ?? null,
        };
    },

    async room_messages(args) {
        const roomId = requireArg(args, "room_id");
        return { events: (roomEvents.get(roomId) ?? []).map(eventToJson) };
    },

    // --- to-device ------------------------------------------------------------------------

    /**
     * Plaintext to-device message: either messages {user: {device: content}} or
     * user_id + device_id + content. Returns the txn id used (txn_id may be given).
     */
    async send_to_device(args) {
        const c = requireClient();
        const type = requireArg(args, "type");
        const messages = args.messages ?? {
            [requireArg(args, "user_id")]: { [requireArg(args, "device_id")]: args.content ?? {} },
        };
        const map = new Map();
        for (const [user, devices] of Object.entries(messages)) {
            map.set(user, new Map(Object.entries(devices)));
        }
        const txnId = args.txn_id ?? c.makeTxnId();
        await withTimeout(c.sendToDevice(type, map, txnId), args.timeout, "sendToDevice");
        return { txn_id: txnId };
    },

    /**
     * Olm-encrypted to-device message of type `type` to devices [{user_id, device_id}] (or
     * user_id + device_id), via crypto.encryptToDeviceMessages (claims one-time keys as needed).
     * Fails if none of the devices is known to the crypto (download_keys first).
     */
    async send_encrypted_to_device(args) {
        const c = requireClient();
        const type = requireArg(args, "type");
        const devices = (args.devices ?? [{ user_id: requireArg(args, "user_id"), device_id: requireArg(args, "device_id") }]).map(
            (d) => ({ userId: d.user_id, deviceId: d.device_id }),
        );
        const batch = await withTimeout(
            requireCrypto().encryptToDeviceMessages(type, devices, args.content ?? {}),
            args.timeout,
            "encryptToDeviceMessages",
        );
        if (batch.batch.length === 0) throw new Error("no message encrypted: none of the devices is known to the crypto");
        const map = new Map();
        for (const m of batch.batch) {
            if (!map.has(m.userId)) map.set(m.userId, new Map());
            map.get(m.userId).set(m.deviceId, m.payload);
        }
        const txnId = args.txn_id ?? c.makeTxnId();
        await withTimeout(c.sendToDevice(batch.eventType, map, txnId), args.timeout, "sendToDevice");
        return {
            txn_id: txnId,
            event_type: batch.eventType,
            sent: batch.batch.map((m) => ({ user_id: m.userId, device_id: m.deviceId })),
        };
    },

    async stop() {
        setImmediate(() => shutdown(0));
        return {};
    },
};

// ---------------------------------------------------------------------------------------------
// main loop

let sdkVersion = null;

async function handleLine(line) {
    line = line.trim();
    if (!line) return;
    let msg;
    try {
        msg = JSON.parse(line);
    } catch (e) {
        emit({ event: "protocol_error", error: `bad JSON: ${errText(e)}`, line: line.slice(0, 200) });
        return;
    }
    const { id, cmd, ...args } = msg;
    const fn = Object.hasOwn(commands, cmd) ? commands[cmd] : null;
    if (!fn) {
        emit({ id, ok: false, error: `unknown command ${JSON.stringify(cmd)}` });
        return;
    }
    try {
        const result = await fn(args);
        emit({ id, ok: true, ...(result ?? {}) });
    } catch (e) {
        plog(`command ${cmd} (id ${id}) failed: ${errText(e)}`);
        emit({ id, ok: false, error: errText(e) });
    }
}

function shutdown(code) {
    if (shuttingDown) return;
    shuttingDown = true;
    try {
        client?.stopClient();
    } catch (e) {
        plog(`stopClient failed: ${errText(e)}`);
    }
    plog(`exiting with ${code}`);
    process.exit(code);
}

async function main() {
    process.on("unhandledRejection", (reason) => plog(`unhandled rejection: ${errText(reason)}`));
    process.on("uncaughtException", (err) => {
        plog(`uncaught exception: ${errText(err)}\n${err?.stack ?? ""}`);
        emit({ event: "fatal", error: errText(err) });
        shutdown(1);
    });
    process.on("SIGTERM", () => shutdown(0));

    try {
        sdk = await import("matrix-js-sdk");
        cryptoApiMod = await import("matrix-js-sdk/lib/crypto-api/index.js");
        wasm = await import("@matrix-org/matrix-sdk-crypto-wasm");
        const { createRequire } = await import("node:module");
        sdkVersion = createRequire(import.meta.url)("matrix-js-sdk/package.json").version;
    } catch (e) {
        emit({ event: "fatal", error: `cannot load matrix-js-sdk (run npm ci in tests/interop): ${errText(e)}` });
        process.exit(2);
    }

    const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
    rl.on("line", (line) => {
        handleLine(line).catch((e) => plog(`handler crashed: ${errText(e)}`));
    });
    rl.on("close", () => {
        plog("stdin closed");
        shutdown(0);
    });
    emit({ event: "ready", sdk: sdkVersion, node: process.version, pid: process.pid });
}

main();
