/**
 * Bundle the command-line tool into dist/cli-bundle/ (what bin/snapstack
 * runs while it is fresh): `node scripts/build-cli.ts`. Runs from
 * `npm run build` and from npm's `prepare` (after `npm install` / `npm ci`
 * in a checkout). No type check here: `npm run typecheck` does that.
 *
 * Design notes
 * - Why: Node starts a command in ~25 ms; loading ~90 separate modules of
 *   the tsc build costs ~40 ms more (resolution, one file and one compile
 *   cache entry each), stripping types from the sources ~60 ms more and
 *   ~40 MiB of memory. One ES module per entry point plus shared chunks
 *   (esbuild, code splitting) loads in a few milliseconds, and each lazily
 *   imported command (src/cli/img-commands.ts, nbd/serve/vm/io in main.ts)
 *   becomes its own chunk, parsed only when that command runs.
 * - import.meta.url in a bundled module would be the chunk's URL, not the
 *   source file's, so relative URLs (../../package.json) would point
 *   elsewhere: each source's import.meta.url is rewritten to the URL of that
 *   source file, relative to the chunk (the package layout is kept when it
 *   is installed elsewhere).
 * - Never stale: bin/snapstack runs the bundle only while main.js is newer
 *   than every file and folder under src/. main.js gets the time the build
 *   *started*, so a source saved during the build leaves it stale.
 * - Node built-ins are not ES-module imports but
 *   `process.getBuiltinModule(...)` calls (builtinModulePlugin): importing
 *   node:fs as an ES module builds its ESM facade, which reads every export,
 *   including the lazy `fs.promises` getter, and so loads fs/promises,
 *   readline, os and the stream modules (~6 ms CPU of every command, for
 *   nothing). Getter exports are left out: a bundled import of one is a build
 *   error. Each export reads its property through a call marked pure, so
 *   esbuild drops the ones nothing imports: reading them all (node:util's
 *   setTraceSigInt loads worker_threads, others the stream modules) loaded
 *   ~35 internal modules at start-up; now node:fs's Dir alone is left.
 *   Measured: `img snapshot -l` 75.0 -> 73.9 ms (medians of 15,
 *   alternating). There are no runtime dependencies to inline.
 */
import { mkdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const REPO_ROOT = fileURLToPath(new URL("..", import.meta.url));
export const CLI_BUNDLE_DIR = join(REPO_ROOT, "dist", "cli-bundle");
const ENTRY = join(REPO_ROOT, "src", "cli", "main.ts");
const SOURCE_FILTER = /\.ts$/;

const IMG_COMMANDS_SOURCE = join(REPO_ROOT, "src", "cli", "img-commands.ts");
const LAZY_COMMAND_IMPORT = /await import\(("\.\/commands\/[\w-]+\.ts")\)/g;

/**
 * Source text of src/cli/img-commands.ts for the bundle: its lazy
 * `await import("./commands/x.ts")` become static imports, so every `img`
 * command is in the entry's own chunks. Lazy loading pays off for the
 * TypeScript sources (each module stripped and compiled apart), not in the
 * bundle, where each extra chunk costs a resolution, a file and a code
 * cache lookup at start-up and the commands share almost all their code.
 */
export function staticImgCommands(text: string): string {
  const imports: string[] = [];
  const body = text.replace(LAZY_COMMAND_IMPORT, (_match, specifier: string) => {
    const name = `imgCommand${imports.length}`;
    imports.push(`import * as ${name} from ${specifier};`);
    return name;
  });
  return `${imports.join("\n")}\n${body}`;
}

/** Replace `import.meta.url` in a source with the URL of that source, relative to `outDir` (where every chunk is). */
function sourceUrlPlugin(outDir: string): esbuild.Plugin {
  return {
    name: "source-import-meta-url",
    setup(build) {
      build.onLoad({ filter: SOURCE_FILTER }, (args) => {
        let text = readFileSync(args.path, "utf8");
        if (args.path === IMG_COMMANDS_SOURCE) text = staticImgCommands(text);
        if (!text.includes("import.meta.url")) return { contents: text, loader: "ts" };
        const fromOutput = relative(outDir, args.path).split("\\").join("/");
        const sourceUrl = `new URL(${JSON.stringify(fromOutput)}, import.meta.url).href`;
        return { contents: text.replaceAll("import.meta.url", sourceUrl), loader: "ts" };
      });
    },
  };
}

const BUILTIN_NAMESPACE = "node-builtin";
const IDENTIFIER = /^[A-Za-z_$][\w$]*$/;

/** Each `node:*` import becomes a module exporting process.getBuiltinModule's object and its plain-value properties. */
function builtinModulePlugin(): esbuild.Plugin {
  return {
    name: "node-builtin-get",
    setup(build) {
      build.onResolve({ filter: /^node:/ }, (args) => ({ path: args.path, namespace: BUILTIN_NAMESPACE }));
      build.onLoad({ filter: /.*/, namespace: BUILTIN_NAMESPACE }, (args) => {
        const builtin = process.getBuiltinModule(args.path) as Record<string, unknown> | undefined;
        if (builtin === undefined) return { errors: [{ text: `no Node built-in module ${args.path}` }] };
        const descriptors = Object.getOwnPropertyDescriptors(builtin);
        const names = Object.keys(descriptors).filter((name) => name !== "default" && IDENTIFIER.test(name) && "value" in descriptors[name]);
        const lines = [`const builtin = process.getBuiltinModule(${JSON.stringify(args.path)});`, "const property = (name) => builtin[name];", "export default builtin;"];
        for (const name of names) lines.push(`export const ${name} = /* @__PURE__ */ property(${JSON.stringify(name)});`);
        return { contents: lines.join("\n"), loader: "js" };
      });
    },
  };
}

/** Build the bundle into `outDir` (default dist/cli-bundle); returns its entry file. */
export async function buildCliBundle(outDir: string = CLI_BUNDLE_DIR): Promise<string> {
  const startedAt = new Date();
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  await esbuild.build({
    entryPoints: { main: ENTRY },
    outdir: outDir,
    bundle: true,
    splitting: true,
    format: "esm",
    platform: "node",
    target: "node22.15",
    // Chunks beside main.js: the rewritten import.meta.url is relative to this one folder.
    chunkNames: "[name]-[hash]",
    entryNames: "[name]",
    legalComments: "none",
    logLevel: "warning",
    plugins: [builtinModulePlugin(), sourceUrlPlugin(outDir)],
  });
  // ES modules wherever the folder is (inside the package, the root package.json says so too).
  writeFileSync(join(outDir, "package.json"), `${JSON.stringify({ type: "module" })}\n`);
  const entryPath = join(outDir, "main.js");
  utimesSync(entryPath, startedAt, startedAt);
  return entryPath;
}

if (import.meta.main) {
  const entryPath = await buildCliBundle();
  process.stdout.write(`build-cli: ${relative(REPO_ROOT, dirname(entryPath))}/main.js\n`);
}
