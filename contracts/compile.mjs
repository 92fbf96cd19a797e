#!/usr/bin/env node
// Deterministic compile of contracts/src/*.sol into contracts/artifacts/<Name>.json.
//
//   node contracts/compile.mjs          write the artifacts
//   node contracts/compile.mjs --check  exit 1 if the committed artifacts differ from a fresh compile
//
// The compiler is the solc-js version pinned in package.json; the settings below are fixed and
// no metadata hash is appended, so the same sources always give byte-identical artifacts.
// Every .sol file under contracts/src/ (sub-folders included) is a compile input; artifacts are
// written only for concrete (non-abstract, non-library, non-interface) contracts that are defined
// in a top-level contracts/src/*.sol file.
import { existsSync, mkdirSync, readdirSync, readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const CONTRACTS_DIR = dirname(fileURLToPath(import.meta.url));
const SRC_DIR = join(CONTRACTS_DIR, "src");
const OUT_DIR = join(CONTRACTS_DIR, "artifacts");

export const SETTINGS = {
  evmVersion: "prague",
  metadata: { appendCBOR: false, bytecodeHash: "none" },
  optimizer: { enabled: true, runs: 200 },
};

function listSolidity(dir) {
  const found = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) found.push(...listSolidity(path));
    else if (entry.isFile() && entry.name.endsWith(".sol")) found.push(path);
  }
  return found.sort();
}

// Source unit names are "src/…" paths with forward slashes, independent of the checkout location.
function unitName(path) {
  return relative(CONTRACTS_DIR, path).split(sep).join("/");
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((key) => [key, sortKeys(value[key])]),
    );
  }
  return value;
}

function compile() {
  const sources = {};
  for (const path of listSolidity(SRC_DIR)) {
    sources[unitName(path)] = { content: readFileSync(path, "utf8") };
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      ...SETTINGS,
      outputSelection: {
        "*": {
          "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"],
          "": ["ast"],
        },
      },
    },
  };
  const output = JSON.parse(
    solc.compile(JSON.stringify(input), {
      import: () => ({ error: "imports must stay inside contracts/src" }),
    }),
  );

  // Warnings are fatal too: the contracts are kept warning-free.
  const problems = (output.errors || []).filter((e) => e.severity !== "info");
  if (problems.length > 0) {
    for (const problem of problems) console.error(problem.formattedMessage || problem.message);
    throw new Error(`solc reported ${problems.length} error(s)/warning(s)`);
  }

  const version = solc.version();
  const artifacts = new Map();
  for (const [source, { ast }] of Object.entries(output.sources)) {
    if (source.split("/").length !== 2) continue; // only top-level src/*.sol files
    for (const node of ast.nodes) {
      if (node.nodeType !== "ContractDefinition") continue;
      if (node.contractKind !== "contract" || node.abstract) continue;
      const compiled = output.contracts[source][node.name];
      const bytecode = compiled.evm.bytecode.object;
      if (!bytecode) throw new Error(`${node.name}: empty bytecode`);
      if (bytecode.includes("__$")) throw new Error(`${node.name}: needs library linking`);
      if (artifacts.has(node.name)) throw new Error(`duplicate contract name ${node.name}`);
      const artifact = sortKeys({
        abi: compiled.abi,
        bytecode: `0x${bytecode}`,
        compiler: { settings: SETTINGS, version },
        contractName: node.name,
        deployedBytecode: `0x${compiled.evm.deployedBytecode.object}`,
        sourceName: `contracts/${source}`,
      });
      artifacts.set(node.name, `${JSON.stringify(artifact, null, 2)}\n`);
    }
  }
  return artifacts;
}

function existingArtifacts() {
  if (!existsSync(OUT_DIR)) return [];
  return readdirSync(OUT_DIR)
    .filter((name) => name.endsWith(".json"))
    .sort();
}

function main(argv) {
  const check = argv.includes("--check");
  const artifacts = compile();
  const names = [...artifacts.keys()].sort();

  if (check) {
    const stale = [];
    for (const name of names) {
      const path = join(OUT_DIR, `${name}.json`);
      if (!existsSync(path)) stale.push(`missing: ${unitName(path)}`);
      else if (readFileSync(path, "utf8") !== artifacts.get(name)) {
        stale.push(`differs: ${unitName(path)}`);
      }
    }
    for (const file of existingArtifacts()) {
      if (!artifacts.has(file.slice(0, -".json".length))) stale.push(`extra: artifacts/${file}`);
    }
    if (stale.length > 0) {
      console.error("contracts/artifacts is out of date (run `npm run compile`):");
      for (const line of stale) console.error(`  ${line}`);
      return 1;
    }
    console.log(`contracts/artifacts up to date (${names.length} contracts, solc ${solc.version()})`);
    return 0;
  }

  mkdirSync(OUT_DIR, { recursive: true });
  for (const name of names) writeFileSync(join(OUT_DIR, `${name}.json`), artifacts.get(name));
  for (const file of existingArtifacts()) {
    if (!artifacts.has(file.slice(0, -".json".length))) {
      unlinkSync(join(OUT_DIR, file)); // the folder holds generated files only
      console.log(`removed stale artifacts/${file}`);
    }
  }
  console.log(`wrote ${names.length} artifacts to contracts/artifacts (solc ${solc.version()})`);
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (error) {
  console.error(error.message);
  process.exitCode = 2;
}
