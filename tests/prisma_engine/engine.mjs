// Test-only stand-in for Prisma's query-engine binary, as prisma-client-py 0.15.0 runs it
// (src/prisma/engine/_query.py): `query-engine -p PORT --enable-metrics --enable-raw-queries`
// with PRISMA_DML_PATH (the schema) and PRISMA_ENGINE_PROTOCOL=graphql; `query-engine --version`.
//
// It serves the binary engine's HTTP routes and runs Prisma's own query engine, compiled to
// WebAssembly (npm @prisma/query-engine-wasm, the same commit as the binary), over node-postgres
// (@prisma/adapter-pg). The WebAssembly engine speaks only Prisma's JSON protocol, so the
// GraphQL documents prisma-client-py writes (a narrow, regular subset: prisma/_builder.py) are
// translated into JSON-protocol requests, and the answers back into the GraphQL protocol's
// shape ({"data": {"result": ...}}, plain JSON values). See README.md for what is not supported.

import fs from 'node:fs'
import http from 'node:http'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

export const ENGINE_COMMIT = '393aa359c9ad4a4bb28630fb5613f9c281cde053'

// ---------------------------------------------------------------- GraphQL subset -> JSON protocol

/** A number literal kept as written (a BigInt column may hold more than 2^53). */
class RawNumber {
  constructor(text) {
    this.text = text
  }
}

const TOKEN =
  /(\s+|,|#[^\n]*)|("(?:[^"\\]|\\[\s\S])*")|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|([{}()[\]:])/y

function tokenize(source) {
  const tokens = []
  TOKEN.lastIndex = 0
  while (TOKEN.lastIndex < source.length) {
    const at = TOKEN.lastIndex
    const m = TOKEN.exec(source)
    if (m === null) throw new GraphQLSubsetError(`unexpected character at ${at}: ${source.slice(at, at + 20)}`)
    if (m[1] !== undefined) continue
    if (m[2] !== undefined) tokens.push({ kind: 'string', value: JSON.parse(m[2]) })
    else if (m[3] !== undefined) tokens.push({ kind: 'number', value: new RawNumber(m[3]) })
    else if (m[4] !== undefined) tokens.push({ kind: 'name', value: m[4] })
    else tokens.push({ kind: 'punct', value: m[5] })
  }
  return tokens
}

export class GraphQLSubsetError extends Error {}

class Parser {
  constructor(source) {
    this.tokens = tokenize(source)
    this.pos = 0
  }
  peek(value) {
    const t = this.tokens[this.pos]
    return t !== undefined && t.kind === 'punct' && t.value === value
  }
  take(kind, value) {
    const t = this.tokens[this.pos]
    if (t === undefined || t.kind !== kind || (value !== undefined && t.value !== value)) {
      throw new GraphQLSubsetError(`expected ${value ?? kind} at token ${this.pos}, got ${t ? JSON.stringify(t.value) : 'end'}`)
    }
    this.pos += 1
    return t.value
  }
  /** `query|mutation { result: name(args) { selection } }` */
  document() {
    const operation = this.take('name')
    if (operation !== 'query' && operation !== 'mutation') throw new GraphQLSubsetError(`operation ${operation}`)
    this.take('punct', '{')
    this.take('name', 'result')
    this.take('punct', ':')
    const field = this.take('name')
    const args = this.peek('(') ? this.arguments() : {}
    const selection = this.peek('{') ? this.selection() : null
    this.take('punct', '}')
    if (this.pos !== this.tokens.length) throw new GraphQLSubsetError('more than one root field')
    return { field, args, selection }
  }
  arguments() {
    this.take('punct', '(')
    const out = {}
    while (!this.peek(')')) {
      const key = this.take('name')
      this.take('punct', ':')
      out[key] = this.value()
      if (this.peek(',')) this.take('punct', ',')
    }
    this.take('punct', ')')
    return out
  }
  value() {
    const t = this.tokens[this.pos]
    if (t === undefined) throw new GraphQLSubsetError('value expected, got end')
    if (t.kind === 'string' || t.kind === 'number') {
      this.pos += 1
      return t.value
    }
    if (t.kind === 'name') {
      this.pos += 1
      if (t.value === 'true') return true
      if (t.value === 'false') return false
      if (t.value === 'null') return null
      return t.value // an enum value: a string in the JSON protocol
    }
    if (t.value === '{') {
      this.pos += 1
      const out = {}
      while (!this.peek('}')) {
        const k = this.tokens[this.pos]
        const key = k && k.kind === 'string' ? (this.pos++, k.value) : this.take('name')
        this.take('punct', ':')
        out[key] = this.value()
        if (this.peek(',')) this.take('punct', ',')
      }
      this.take('punct', '}')
      return out
    }
    if (t.value === '[') {
      this.pos += 1
      const out = []
      while (!this.peek(']')) {
        out.push(this.value())
        if (this.peek(',')) this.take('punct', ',')
      }
      this.take('punct', ']')
      return out
    }
    throw new GraphQLSubsetError(`unexpected ${JSON.stringify(t.value)} at token ${this.pos}`)
  }
  /** `{ a b rel { ... } rel2(args) { ... } }` -> JSON protocol selection */
  selection() {
    this.take('punct', '{')
    const out = {}
    while (!this.peek('}')) {
      const name = this.take('name')
      const args = this.peek('(') ? this.arguments() : null
      const nested = this.peek('{') ? this.selection() : null
      if (args === null && nested === null) {
        out[name] = true
      } else {
        out[name] = { ...(args ? { arguments: args } : {}), selection: nested ?? { $scalars: true } }
      }
    }
    this.take('punct', '}')
    return out
  }
}

const MODEL_ACTIONS = [
  // longest prefixes first: "findUnique" must not take "findUniqueXOrThrow"'s suffix
  'findUnique',
  'findFirst',
  'findMany',
  'createOne',
  'createMany',
  'updateOne',
  'updateMany',
  'deleteOne',
  'deleteMany',
  'upsertOne',
  'aggregate',
  'groupBy',
]
const RAW_ACTIONS = new Set(['executeRaw', 'queryRaw'])

// ----------------------------------------------------------------------- Json-typed values
//
// The GraphQL protocol took a Json field's value as a string of JSON; the JSON protocol takes a
// plain string as a JSON *string* (stored as "\"{...}\""), and wants {"$type": "Json", "value"}.
// The GraphQL document does not say which values are Json: the datamodel does.

const SCALARS = new Set(['String', 'Int', 'BigInt', 'Float', 'Decimal', 'Boolean', 'DateTime', 'Json', 'Bytes'])

/** model -> field -> {type, optional, list, relation} from the schema text (no attributes). */
export function parseDatamodel(datamodel) {
  const names = new Set([...datamodel.matchAll(/^\s*model\s+(\w+)\s*{/gm)].map((m) => m[1]))
  const models = new Map()
  for (const m of datamodel.matchAll(/^\s*model\s+(\w+)\s*{([\s\S]*?)^\s*}/gm)) {
    const fields = new Map()
    for (const line of m[2].split('\n')) {
      const f = /^\s*(\w+)\s+(\w+)(\[\])?(\?)?/.exec(line.replace(/\/\/.*$/, ''))
      if (!f || f[1].startsWith('@')) continue
      fields.set(f[1], {
        type: f[2],
        list: Boolean(f[3]),
        optional: Boolean(f[4]),
        relation: !SCALARS.has(f[2]) && names.has(f[2]) ? f[2] : null,
      })
    }
    models.set(m[1], fields)
  }
  return models
}

const JSON_FILTER_VALUES = new Set(['equals', 'not', 'array_contains', 'array_starts_with', 'array_ends_with', 'gt', 'gte', 'lt', 'lte'])
const RELATION_FILTERS = new Set(['is', 'isNot', 'some', 'every', 'none'])
const LOGICAL = new Set(['AND', 'OR', 'NOT'])

function jsonValue(value, field) {
  if (value === null) return { $type: 'Enum', value: field.optional ? 'DbNull' : 'JsonNull' }
  if (typeof value === 'string') return { $type: 'Json', value }
  return value
}

function jsonFilterValue(value) {
  if (value === null) return { $type: 'Enum', value: 'DbNull' }
  if (typeof value === 'string') return { $type: 'Json', value }
  if (value instanceof RawNumber || typeof value === 'boolean') return { $type: 'Json', value: stringify(value) }
  return value
}

function each(value, fn) {
  return Array.isArray(value) ? value.map(fn) : fn(value)
}

/** A where (filter) object of `model`: Json filter values wrapped, relations followed. */
function typeWhere(models, model, where) {
  const fields = models.get(model)
  if (!fields || where === null || typeof where !== 'object' || Array.isArray(where)) return where
  const out = {}
  for (const [key, value] of Object.entries(where)) {
    const field = fields.get(key)
    if (LOGICAL.has(key)) out[key] = each(value, (w) => typeWhere(models, model, w))
    else if (field?.type === 'Json' && value !== null && typeof value === 'object' && !Array.isArray(value)) {
      out[key] = Object.fromEntries(
        Object.entries(value).map(([op, v]) => [op, JSON_FILTER_VALUES.has(op) ? jsonFilterValue(v) : v]),
      )
    } else if (field?.type === 'Json') out[key] = jsonFilterValue(value)
    else if (field?.relation && value !== null && typeof value === 'object') {
      const isFilter = Object.keys(value).some((k) => RELATION_FILTERS.has(k))
      out[key] = isFilter
        ? Object.fromEntries(Object.entries(value).map(([op, v]) => [op, typeWhere(models, field.relation, v)]))
        : typeWhere(models, field.relation, value)
    } else out[key] = value
  }
  return out
}

/** A create / update data object of `model`: Json values wrapped, nested writes followed. */
function typeData(models, model, data) {
  const fields = models.get(model)
  if (!fields || data === null || typeof data !== 'object' || Array.isArray(data)) return data
  const out = {}
  for (const [key, value] of Object.entries(data)) {
    const field = fields.get(key)
    if (field?.type === 'Json') out[key] = jsonValue(value, field)
    else if (field?.relation && value !== null && typeof value === 'object') {
      out[key] = typeNestedWrite(models, field.relation, value)
    } else out[key] = value
  }
  return out
}

function typeNestedWrite(models, model, ops) {
  const out = {}
  for (const [op, value] of Object.entries(ops)) {
    const data = (d) => typeData(models, model, d)
    const where = (w) => typeWhere(models, model, w)
    switch (op) {
      case 'create':
        out[op] = each(value, data)
        break
      case 'createMany':
        out[op] = { ...value, data: each(value.data, data) }
        break
      case 'connect':
      case 'disconnect':
      case 'delete':
      case 'set':
        out[op] = typeof value === 'boolean' ? value : each(value, where)
        break
      case 'deleteMany':
        out[op] = each(value, where)
        break
      case 'connectOrCreate':
        out[op] = each(value, (v) => ({ where: where(v.where), create: data(v.create) }))
        break
      case 'update':
      case 'updateMany':
        out[op] = each(value, (v) =>
          v && 'data' in v ? { ...v, ...(v.where ? { where: where(v.where) } : {}), data: data(v.data) } : data(v),
        )
        break
      case 'upsert':
        out[op] = each(value, (v) => ({
          ...v,
          ...(v.where ? { where: where(v.where) } : {}),
          create: data(v.create),
          update: data(v.update),
        }))
        break
      default:
        out[op] = value
    }
  }
  return out
}

/** A JSON-protocol request's arguments of `model`, with every Json value typed. */
export function typeArguments(models, model, args) {
  const out = { ...args }
  if (out.where !== undefined) out.where = typeWhere(models, model, out.where)
  if (out.data !== undefined) out.data = each(out.data, (d) => typeData(models, model, d))
  if (out.create !== undefined) out.create = typeData(models, model, out.create)
  if (out.update !== undefined) out.update = typeData(models, model, out.update)
  return out
}

function typeSelection(models, model, selection) {
  const fields = models.get(model)
  if (!fields || !selection) return selection
  const out = {}
  for (const [key, value] of Object.entries(selection)) {
    const field = fields.get(key)
    if (field?.relation && value && typeof value === 'object') {
      out[key] = {
        ...value,
        ...(value.arguments ? { arguments: typeArguments(models, field.relation, value.arguments) } : {}),
        selection: typeSelection(models, field.relation, value.selection),
      }
    } else out[key] = value
  }
  return out
}

/** One GraphQL document of prisma-client-py -> one JSON-protocol request. */
export function translateQuery(source, models = new Map()) {
  const { field, args, selection } = new Parser(source).document()
  if (RAW_ACTIONS.has(field)) {
    return { action: field, query: { arguments: args, selection: selection ?? {} } }
  }
  for (const prefix of MODEL_ACTIONS) {
    if (!field.startsWith(prefix) || field.length === prefix.length) continue
    let model = field.slice(prefix.length)
    let action = prefix
    if ((prefix === 'findUnique' || prefix === 'findFirst') && model.endsWith('OrThrow')) {
      model = model.slice(0, -'OrThrow'.length)
      action = `${prefix}OrThrow`
    }
    return {
      modelName: model,
      action,
      query: {
        arguments: typeArguments(models, model, args),
        selection: typeSelection(models, model, selection ?? { $scalars: true }),
      },
    }
  }
  throw new GraphQLSubsetError(`unsupported root field ${field}`)
}

/** JSON.stringify that writes RawNumber as written. */
export function stringify(value) {
  if (value instanceof RawNumber) return value.text
  if (value === null || typeof value !== 'object') return JSON.stringify(value)
  if (Array.isArray(value)) return `[${value.map(stringify).join(',')}]`
  const parts = []
  for (const [k, v] of Object.entries(value)) if (v !== undefined) parts.push(`${JSON.stringify(k)}:${stringify(v)}`)
  return `{${parts.join(',')}}`
}

/** JSON-protocol values -> the GraphQL protocol's: {"$type": "DateTime", "value": v} -> v. */
export function plain(value) {
  if (Array.isArray(value)) return value.map(plain)
  if (value === null || typeof value !== 'object') return value
  const keys = Object.keys(value)
  if (keys.length === 2 && typeof value.$type === 'string' && 'value' in value) return plain(value.value)
  const out = {}
  for (const k of keys) out[k] = plain(value[k])
  return out
}

/** A JSON-protocol answer {"data": {"findUniqueX": r}} -> {"data": {"result": r}}; errors as they are. */
export function graphqlAnswer(answer) {
  if (answer.errors) return { errors: answer.errors }
  const values = Object.values(answer.data ?? {})
  return { data: { result: values.length ? plain(values[0]) : null } }
}

function translationError(error) {
  // no error_code: prisma-client-py raises DataError with this message
  return { errors: [{ error: String(error.message ?? error), user_facing_error: { message: String(error.message ?? error) } }] }
}

// ---------------------------------------------------------------------------- engine and server

function parseArgs(argv) {
  const out = { port: null, version: false }
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--version' || argv[i] === '-V') out.version = true
    else if (argv[i] === '-p' || argv[i] === '--port') out.port = Number(argv[++i])
  }
  return out
}

/** The datasource URL: OVERWRITE_DATASOURCES, else the env var the schema's datasource names. */
function datasourceUrl(datamodel) {
  const overrides = process.env.OVERWRITE_DATASOURCES
  if (overrides) {
    const found = JSON.parse(overrides).find((d) => d.url)
    if (found) return found.url
  }
  const block = /datasource\s+\w+\s*{([\s\S]*?)}/.exec(datamodel)
  const url = block && /url\s*=\s*(?:env\(\s*"([^"]+)"\s*\)|"([^"]+)")/.exec(block[1])
  if (!url) throw new Error('no datasource url in the schema')
  const value = url[1] !== undefined ? process.env[url[1]] : url[2]
  if (!value) throw new Error(`datasource url: env ${url[1]} is not set`)
  return value
}

/** node-postgres settings from a Prisma connection string (Prisma's own query parameters dropped). */
function poolConfig(connectionString) {
  const url = new URL(connectionString)
  const params = url.searchParams
  const config = {
    host: params.get('host') || url.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1',
    port: url.port ? Number(url.port) : 5432,
    user: decodeURIComponent(url.username) || undefined,
    password: url.password ? decodeURIComponent(url.password) : undefined,
    database: decodeURIComponent(url.pathname.replace(/^\//, '')) || undefined,
    max: Number(params.get('connection_limit')) || 10,
    application_name: params.get('application_name') || 'prisma-engine-standin',
  }
  if (params.get('options')) config.options = params.get('options')
  if (params.get('connect_timeout')) config.connectionTimeoutMillis = Number(params.get('connect_timeout')) * 1000
  const sslmode = params.get('sslmode')
  if (sslmode && sslmode !== 'disable' && sslmode !== 'prefer') config.ssl = { rejectUnauthorized: sslmode === 'verify-full' }
  return { config, schema: params.get('schema') || undefined }
}

async function loadEngine(here) {
  const wasmDir = path.join(here, 'node_modules', '@prisma', 'query-engine-wasm', 'postgresql')
  const runtime = await import(path.join(wasmDir, 'query_engine_bg.js'))
  const module = new WebAssembly.Module(fs.readFileSync(path.join(wasmDir, 'query_engine_bg.wasm')))
  const instance = new WebAssembly.Instance(module, { './query_engine_bg.js': runtime })
  runtime.__wbg_set_wasm(instance.exports)
  return runtime
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = []
    req.on('data', (c) => chunks.push(c))
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')))
    req.on('error', reject)
  })
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
  if (args.version) {
    console.log(`query-engine ${ENGINE_COMMIT}`)
    return
  }
  if (!args.port) throw new Error('usage: query-engine -p PORT (or --version)')
  const here = path.dirname(fileURLToPath(import.meta.url))
  const dmlPath = process.env.PRISMA_DML_PATH
  if (!dmlPath) throw new Error('PRISMA_DML_PATH is not set')
  const datamodel = fs.readFileSync(dmlPath, 'utf8')
  const models = parseDatamodel(datamodel)

  const [{ default: pg }, { PrismaPg }, { bindAdapter }, qe] = await Promise.all([
    import('pg'),
    import('@prisma/adapter-pg'),
    import('@prisma/driver-adapter-utils'),
    loadEngine(here),
  ])
  const { config, schema } = poolConfig(datasourceUrl(datamodel))
  const pool = new pg.Pool(config)
  pool.on('error', (e) => console.error('prisma-engine-standin: idle client error:', e.message))
  const adapter = bindAdapter(new PrismaPg(pool, schema ? { schema } : undefined))
  const logLevel = process.env.LOG_QUERIES ? 'info' : 'error'
  const engine = new qe.QueryEngine(
    { datamodel, logLevel, logQueries: Boolean(process.env.LOG_QUERIES) },
    (line) => {
      if (logLevel !== 'error' || /"level":"(ERROR|WARN)"/i.test(line)) console.error(line)
    },
    adapter,
  )
  await engine.connect('{}')

  async function query(body, txId) {
    const request = JSON.parse(body)
    if (Array.isArray(request.batch)) {
      let batch
      try {
        batch = request.batch.map((item) => translateQuery(item.query, models))
      } catch (error) {
        return translationError(error)
      }
      const payload = { batch: batch, ...(request.transaction ? { transaction: {} } : {}) }
      const answer = JSON.parse(await engine.query(stringify(payload), '{}', txId))
      if (answer.errors) return { errors: answer.errors }
      const results = (answer.batchResult ?? []).map(graphqlAnswer)
      const failed = results.find((r) => r.errors)
      return failed ? { errors: failed.errors } : { batchResult: results }
    }
    let translated
    try {
      translated = translateQuery(request.query, models)
    } catch (error) {
      return translationError(error)
    }
    return graphqlAnswer(JSON.parse(await engine.query(stringify(translated), '{}', txId)))
  }

  async function handle(req) {
    const url = new URL(req.url, 'http://localhost')
    const body = await readBody(req)
    const tx = /^\/transaction\/([^/]+)\/(commit|rollback)$/.exec(url.pathname)
    if (req.method === 'GET' && url.pathname === '/status') return { status: 'ok' }
    if (req.method === 'POST' && url.pathname === '/') return query(body, req.headers['x-transaction-id'])
    if (req.method === 'POST' && url.pathname === '/transaction/start') {
      return JSON.parse(await engine.startTransaction(body || '{}', '{}'))
    }
    if (req.method === 'POST' && tx) {
      const op = tx[2] === 'commit' ? engine.commitTransaction : engine.rollbackTransaction
      return JSON.parse(await op.call(engine, decodeURIComponent(tx[1]), '{}'))
    }
    if (req.method === 'GET' && url.pathname === '/metrics') {
      // the WebAssembly engine keeps no metrics: an empty set in either format
      return url.searchParams.get('format') === 'prometheus' ? '' : { counters: [], gauges: [], histograms: [] }
    }
    return null
  }

  const server = http.createServer((req, res) => {
    handle(req).then(
      (answer) => {
        if (answer === null) {
          res.writeHead(404, { 'content-type': 'text/plain' }).end(`not found: ${req.method} ${req.url}`)
        } else if (typeof answer === 'string') {
          res.writeHead(200, { 'content-type': 'text/plain' }).end(answer)
        } else {
          res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer))
        }
      },
      (error) => {
        console.error('prisma-engine-standin:', error)
        const message = String(error?.message ?? error)
        res
          .writeHead(500, { 'content-type': 'application/json' })
          .end(JSON.stringify({ errors: [{ error: message, user_facing_error: { message } }] }))
      },
    )
  })
  // prisma-client-py connects to http://localhost:PORT: both loopback families
  await new Promise((resolve, reject) => server.once('error', reject).listen(args.port, '127.0.0.1', resolve))
  const server6 = http.createServer(server.listeners('request')[0])
  server6.on('error', () => {}) // no IPv6 loopback: IPv4 only
  server6.listen(args.port, '::1')

  let stopping = false
  const stop = () => {
    if (stopping) return
    stopping = true
    server.close()
    server6.close()
    const done = () => process.exit(0)
    setTimeout(done, 2000).unref()
    engine
      .disconnect('{}')
      .catch(() => {})
      .then(() => pool.end())
      .catch(() => {})
      .then(done)
  }
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
  // the parent went away without a signal (a crash): do not outlive it
  const parent = process.ppid
  setInterval(() => {
    try {
      process.kill(parent, 0)
    } catch {
      stop()
    }
  }, 1000).unref()
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  main().catch((error) => {
    console.error('prisma-engine-standin:', error?.stack ?? error)
    process.exit(1)
  })
}
