// Fixed test vectors for bot_toolkit's secret-storage and recovery-key code, computed by
// matrix-js-sdk (an independent implementation). Prints one JSON object on stdout.
// tests/test_identity_crypto.py hard-codes this output; tests/test_identity_interop.py re-runs
// this script and checks the hard-coded values still match.
import "./polyfill.mjs";
import { encodeRecoveryKey, decodeRecoveryKey } from "matrix-js-sdk/lib/crypto-api/recovery-key.js";
import { deriveRecoveryKeyFromPassphrase } from "matrix-js-sdk/lib/crypto-api/key-passphrase.js";
import { calculateKeyCheck } from "matrix-js-sdk/lib/secret-storage.js";
import encryptAESSecretStorageItem from "matrix-js-sdk/lib/utils/encryptAESSecretStorageItem.js";

const hex = (u8) => Buffer.from(u8).toString("hex");
const key = Uint8Array.from({ length: 32 }, (_, i) => i + 1); // 01 02 .. 20
const zeros = new Uint8Array(32);
const ivB64 = Buffer.from(Uint8Array.from({ length: 16 }, (_, i) => (i * 17) & 0x7f)).toString("base64");

const out = {
    key_hex: hex(key),
    recovery_key: encodeRecoveryKey(key),
    recovery_key_zeros: encodeRecoveryKey(zeros),
    decoded_hex: hex(decodeRecoveryKey(encodeRecoveryKey(key))),
    iv_b64: ivB64,
    key_check: await calculateKeyCheck(key, ivB64),
    secret: await encryptAESSecretStorageItem("c2VlZCBvZiB0aGUgbWFzdGVyIGtleQ", key, "m.cross_signing.master", ivB64),
    passphrase_hex: hex(await deriveRecoveryKeyFromPassphrase("correct horse battery staple", "MmMsAlty", 1000, 256)),
};
process.stdout.write(JSON.stringify(out) + "\n");
