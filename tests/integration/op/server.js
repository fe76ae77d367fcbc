// A real OpenID Provider (panva/node-oidc-provider, OpenID certified) for the verifier's
// integration tests. Test harness only: secrets are fixed, storage is in memory, HTTP on loopback.
//
// Usage:  node server.js CONFIG.json        (or OP_CONFIG=CONFIG.json node server.js)
// Without a config file: OP_PORT and OP_KEYS_FILE (a private JWKS) are required.
//
// Config (JSON; every key optional except keys_file and port):
//   {
//     "port": 9400, "host": "127.0.0.1",
//     "keys_file": "/path/private-jwks.json",        // {"keys": [private JWKs with kid, alg]}
//     "signing_kids": {"ES256": "kid", ...},         // which key signs each alg (default: the first key of that alg)
//     "access_token_ttl": 300,                       // seconds
//     "clients": [{"client_id": "app", "client_secret": "...", "scope": "read write admin"}],
//     "backchannel_logout_uri": "http://127.0.0.1:8080/v1/backchannel-logout",  // the web client's (Back-Channel
//                                                    // Logout 1.0, sid required); loopback allowed (tests only)
//     "access_token_sid": false                      // true: user access tokens carry `sid`, as Keycloak's do
//     "introspection_as": null                       // "keycloak": answers name typ/token_type (Refresh) as Keycloak's
//   }
//
// Resource indicators (RFC 8707) -> access tokens (RFC 9068 JWT, typ at+jwt, unless opaque):
//   https://api.example.test          aud https://api.example.test   ES256
//   https://api.example.test/es256    aud https://api.example.test   ES256
//   https://api.example.test/rs256    aud https://api.example.test   RS256
//   https://api.example.test/eddsa    aud https://api.example.test   EdDSA (Ed25519)
//   https://other.example.test        aud https://other.example.test ES256 (a wrong-audience token)
//   https://opaque.example.test       opaque (introspect it)
//
// Extra endpoints, for tests only (not part of OpenID):
//   GET  /__stats          counts of requests served per endpoint since start (or the last reset)
//   POST /__stats/reset    zero the counts
//   POST /__reload         re-read the config and keys file and swap in a new Provider (key rotation
//                          without a restart; in-memory tokens and grants survive, the port stays)
//   POST /__faults         {"jwks": {"status": 503, "delay_ms": 0}, ...} answer an endpoint with an
//                          error and/or delay it; {} clears every fault
//   POST /__login/:uid     {"accountId": "alice", "acr": "phr", "amr": ["hwk"], "ts": 1700000000,
//                           "groups": ["platform-admins"], "claims": {"realm_access": {"roles": ["admin"]}}}:
//                          finish the pending login interaction
//                          `uid` (from the /auth redirect to /interaction/:uid) as that user, with that
//                          authentication context and time, and grant consent to every requested scope
//                          and resource; answers {"returnTo": ".../auth/:uid"} (GET it with the
//                          cookies /auth set to get the code). Stands in for a login page.
//
// User tokens (authorization code + PKCE, client "web", redirect_uri WEB_REDIRECT_URI): JWT access
// tokens for a resource carry sub (the account), auth_time, acr, amr (from the login, copied from the
// authorization code by extraTokenClaims), groups and any other claims (a Keycloak-shaped realm_access)
// as given at /__login. Client-credentials tokens
// are unchanged. A login asking for offline_access with prompt=consent gets an opaque refresh token too,
// which the introspection endpoint answers active (sub, client_id, scope, exp; no aud, no token_type).
// Logout: RP-initiated logout (GET end_session_endpoint, then POST the confirmation form with its xsrf
// and logout=yes) ends the session; with backchannel_logout_uri the provider first POSTs a logout
// token (typ logout+jwt, signed RS256 like the ID token, aud "web", sid and sub) there and logs
// `BACKCHANNEL_OK` or `BACKCHANNEL_ERROR <message>` on stdout.
// Requests carrying the header "x-op-harness: 1" are not counted (the harness's own bookkeeping).
//
// Ready: prints one line `OP_READY {"issuer": ..., "port": ...}` on stdout once listening.

import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const API_AUDIENCE = 'https://api.example.test';
const DEFAULT_SCOPE = 'read write admin';
// The one authorization-code client, for user tokens; its redirect_uri is never fetched.
const WEB_CLIENT = {
  client_id: 'web',
  client_secret: 'web-secret-for-tests-only',
  redirect_uri: 'http://127.0.0.1/callback',
};

// resource indicator -> [audience, format, alg]
const RESOURCE_SERVERS = {
  [API_AUDIENCE]: [API_AUDIENCE, 'jwt', 'ES256'],
  [`${API_AUDIENCE}/es256`]: [API_AUDIENCE, 'jwt', 'ES256'],
  [`${API_AUDIENCE}/rs256`]: [API_AUDIENCE, 'jwt', 'RS256'],
  [`${API_AUDIENCE}/eddsa`]: [API_AUDIENCE, 'jwt', 'EdDSA'],
  'https://other.example.test': ['https://other.example.test', 'jwt', 'ES256'],
  'https://opaque.example.test': ['https://opaque.example.test', 'opaque', null],
};

// Routes as configured below; the value is the stats key.
const COUNTED_ROUTES = {
  '/.well-known/openid-configuration': 'discovery',
  '/jwks': 'jwks',
  '/token': 'token',
  '/token/introspection': 'introspection',
  '/token/revocation': 'revocation',
  '/auth': 'authorization',
};

// The stock in-memory adapter keeps one store per Provider instance, so a /__reload would forget
// every issued opaque token. This one keeps them in the process, across reloads (not restarts).
const records = new Map(); // `${model}:${id}` -> { payload, expiresAt (ms) }
const grantMembers = new Map(); // grantId -> Set of record keys
// accountId -> { groups, claims }: what /__login said about each user; kept across reloads like the records.
const accounts = new Map();

class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    records.set(key, { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : undefined });
    if (payload.grantId) {
      if (!grantMembers.has(payload.grantId)) grantMembers.set(payload.grantId, new Set());
      grantMembers.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    const key = this.key(id);
    const record = records.get(key);
    if (!record) return undefined;
    if (record.expiresAt !== undefined && record.expiresAt < Date.now()) {
      records.delete(key);
      return undefined;
    }
    return record.payload;
  }

  async findByUid(uid) {
    for (const [key, record] of records) {
      if (key.startsWith(`${this.model}:`) && record.payload.uid === uid) return record.payload;
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const [key, record] of records) {
      if (key.startsWith(`${this.model}:`) && record.payload.userCode === userCode) return record.payload;
    }
    return undefined;
  }

  async consume(id) {
    const record = records.get(this.key(id));
    if (record) record.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    records.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantMembers.get(grantId) ?? []) records.delete(key);
    grantMembers.delete(grantId);
  }
}

function loadConfig() {
  const path = process.argv[2] || process.env.OP_CONFIG;
  const config = path ? JSON.parse(fs.readFileSync(path, 'utf8')) : {};
  config.port = Number(config.port ?? process.env.OP_PORT);
  config.host = config.host ?? process.env.OP_HOST ?? '127.0.0.1';
  config.keys_file = config.keys_file ?? process.env.OP_KEYS_FILE;
  if (!config.port) throw new Error('port missing (config "port" or OP_PORT)');
  if (!config.keys_file) throw new Error('keys file missing (config "keys_file" or OP_KEYS_FILE)');
  config.access_token_ttl = Number(config.access_token_ttl ?? process.env.OP_ACCESS_TOKEN_TTL ?? 300);
  config.signing_kids = config.signing_kids ?? {};
  config.backchannel_logout_uri = config.backchannel_logout_uri ?? null;
  config.access_token_sid = Boolean(config.access_token_sid);
  config.introspection_as = config.introspection_as ?? null;
  config.clients = config.clients ?? [
    { client_id: 'app', client_secret: 'app-secret-for-tests-only', scope: DEFAULT_SCOPE },
    { client_id: 'verifier', client_secret: 'verifier-secret-for-tests-only', scope: DEFAULT_SCOPE },
  ];
  return config;
}

// The issuer: http://host:port, or config.issuer (e.g. http://127.0.0.1:PROXY/tenant-a, a tenant of a
// multi-tenant provider behind a path-prefix proxy: the proxy keeps the Host header and the path).
function issuerOf(config) {
  return config.issuer ?? `http://${config.host}:${config.port}`;
}

function buildProvider(config) {
  const jwks = JSON.parse(fs.readFileSync(config.keys_file, 'utf8'));
  const issuer = issuerOf(config);

  const provider = new Provider(issuer, {
    adapter: SharedMemoryAdapter,
    jwks,
    clients: [
      ...config.clients.map((c) => ({
        client_id: c.client_id,
        client_secret: c.client_secret,
        scope: c.scope ?? DEFAULT_SCOPE,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      })),
      {
        client_id: WEB_CLIENT.client_id,
        client_secret: WEB_CLIENT.client_secret,
        scope: `openid offline_access ${DEFAULT_SCOPE}`,
        // refresh_token: a login asking for offline_access with prompt=consent gets a refresh token too.
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: [WEB_CLIENT.redirect_uri],
        token_endpoint_auth_method: 'client_secret_basic',
        ...(config.backchannel_logout_uri
          ? { backchannel_logout_uri: config.backchannel_logout_uri, backchannel_logout_session_required: true }
          : {}),
      },
    ],
    // offline_access (the provider's default, with openid): it issues refresh tokens, and answers for them.
    scopes: ['openid', 'offline_access', ...DEFAULT_SCOPE.split(' ')],
    cookies: { keys: ['test-harness-cookie-key-not-secret'] },
    // Seconds; explicit so the provider does not warn about its defaults on every user login.
    ttl: {
      ClientCredentials: config.access_token_ttl,
      AccessToken: config.access_token_ttl,
      AuthorizationCode: 60,
      IdToken: 300,
      Interaction: 600,
      Grant: 3600,
      Session: 3600,
    },
    findAccount: async (_ctx, sub) => ({
      accountId: sub,
      claims: async () => ({ sub, groups: accounts.get(sub)?.groups }),
    }),
    // RFC 9068 section 2.2.1: a user's access token says how and when the user authenticated. The
    // provider keeps acr/amr/authTime on the authorization code but leaves them out of JWT access tokens.
    extraTokenClaims: async (ctx, token) => {
      if (!token.accountId) return undefined;
      const code = ctx.oidc?.entities?.AuthorizationCode;
      // The login's own claims first: the ones below (what the provider says itself) win over them.
      const claims = { ...(accounts.get(token.accountId)?.claims ?? {}) };
      if (code) {
        if (code.authTime !== undefined) claims.auth_time = code.authTime;
        if (code.acr !== undefined) claims.acr = code.acr;
        if (code.amr !== undefined) claims.amr = code.amr;
      }
      const groups = accounts.get(token.accountId)?.groups;
      if (groups) claims.groups = groups;
      if (config.access_token_sid && token.sid) claims.sid = token.sid;
      return claims;
    },
    // The provider refuses to call special-use addresses (SSRF protection); the verifier under test
    // listens on loopback, so the harness lets its back-channel logout requests through.
    fetch: (url, options) => {
      const { dispatcher: _ssrfGuard, ...rest } = options;
      return globalThis.fetch(url, rest);
    },
    features: {
      devInteractions: { enabled: false },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Any authenticated confidential client (the verifier) may introspect any token.
        allowedPolicy: async () => true,
      },
      revocation: {
        enabled: true,
        // Any authenticated confidential client may revoke any token, so tests need not track who issued it.
        allowedPolicy: async () => true,
      },
      dPoP: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf ?? API_AUDIENCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resourceIndicator) => {
          const entry = RESOURCE_SERVERS[resourceIndicator];
          if (!entry) throw new errors.InvalidTarget();
          const [audience, format, alg] = entry;
          const info = {
            audience,
            scope: DEFAULT_SCOPE,
            accessTokenTTL: config.access_token_ttl,
            accessTokenFormat: format,
          };
          if (format === 'jwt') {
            const kid = config.signing_kids[alg];
            info.jwt = { sign: kid ? { alg, kid } : { alg } };
          }
          return info;
        },
      },
    },
  });
  // introspection_as "keycloak": active answers as Keycloak writes them (its AccessTokenIntrospectionProvider): the
  // token's own `typ` ("Bearer", a refresh token's "Refresh"), repeated as `token_type`, and a refresh token's
  // answer naming an audience (Keycloak's: its realm; here the grant's resource, the access token's audience).
  if (config.introspection_as === 'keycloak') {
    provider.use(async (ctx, next) => {
      await next();
      if (ctx.oidc?.route !== 'introspection' || ctx.body?.active !== true) return;
      const refresh = ctx.oidc.entities.RefreshToken;
      const typ = refresh ? 'Refresh' : 'Bearer';
      Object.assign(ctx.body, { typ, token_type: typ });
      if (refresh) ctx.body.aud = [].concat(refresh.resource ?? API_AUDIENCE);
    });
  }
  provider.on('backchannel.success', () => console.log('BACKCHANNEL_OK'));
  provider.on('backchannel.error', (_ctx, err) => console.log(`BACKCHANNEL_ERROR ${err.message}`));
  return provider;
}

const stats = {};
function resetStats() {
  for (const key of [...Object.values(COUNTED_ROUTES), 'other', 'total']) stats[key] = 0;
}
resetStats();
let faults = {};
let reloads = 0;

const config = loadConfig();
let provider = buildProvider(config);
let handler = provider.callback();
const issuer = issuerOf(config);
// The issuer's path (empty without config.issuer): requests arrive under it and are served as if
// mounted there (oidc-provider reads the mount path from req.originalUrl, as under express).
const mountPath = new URL(issuer).pathname.replace(/\/$/, '');

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

async function control(req, res, path) {
  if (path === '/__stats' && req.method === 'GET') {
    return sendJson(res, 200, { ...stats, reloads });
  }
  if (path === '/__stats/reset' && req.method === 'POST') {
    resetStats();
    return sendJson(res, 200, { ...stats, reloads });
  }
  if (path === '/__reload' && req.method === 'POST') {
    try {
      const fresh = loadConfig();
      if (fresh.port !== config.port || fresh.host !== config.host) {
        return sendJson(res, 400, { error: 'port and host cannot change on reload; restart instead' });
      }
      provider = buildProvider(fresh);
      handler = provider.callback();
      Object.assign(config, fresh);
      reloads += 1;
      return sendJson(res, 200, { reloaded: true, reloads });
    } catch (err) {
      return sendJson(res, 500, { error: String(err) });
    }
  }
  const login = path.match(/^\/__login\/([^/]+)$/);
  if (login && req.method === 'POST') {
    try {
      return sendJson(res, 200, { returnTo: await finishLogin(decodeURIComponent(login[1]), JSON.parse(await readBody(req))) });
    } catch (err) {
      return sendJson(res, 400, { error: String(err) });
    }
  }
  if (path === '/__faults' && req.method === 'POST') {
    try {
      faults = JSON.parse((await readBody(req)) || '{}');
    } catch (err) {
      return sendJson(res, 400, { error: String(err) });
    }
    return sendJson(res, 200, faults);
  }
  return sendJson(res, 404, { error: 'not_found' });
}

// What a login + consent page would do: store the interaction's result, as interactionFinished does,
// but found by uid rather than by the browser's cookie, so a test needs no HTML.
async function finishLogin(uid, body) {
  const interaction = await provider.Interaction.find(uid);
  if (!interaction) throw new Error(`no pending interaction ${uid}`);
  const accountId = String(body.accountId ?? 'alice');
  const claims = body.claims && typeof body.claims === 'object' && !Array.isArray(body.claims) ? body.claims : undefined;
  accounts.set(accountId, { groups: body.groups ?? undefined, claims });
  const { params } = interaction;
  const grant = new provider.Grant({ accountId, clientId: params.client_id });
  if (params.scope) grant.addOIDCScope(params.scope);
  const resources = params.resource ? [].concat(params.resource) : [API_AUDIENCE];
  for (const resource of resources) grant.addResourceScope(resource, params.scope ?? DEFAULT_SCOPE);
  const grantId = await grant.save();
  const result = {
    login: { accountId, acr: body.acr, amr: body.amr, ts: body.ts ?? Math.floor(Date.now() / 1000), remember: false },
    consent: { grantId },
  };
  interaction.result = result;
  await interaction.save(interaction.exp - Math.floor(Date.now() / 1000));
  return interaction.returnTo;
}

const server = http.createServer(async (req, res) => {
  if (mountPath) {
    const full = new URL(req.url, 'http://x').pathname;
    if (full !== mountPath && !full.startsWith(`${mountPath}/`)) return sendJson(res, 404, { error: 'not_found' });
    req.originalUrl = req.url;
    req.url = req.url.slice(mountPath.length) || '/';
  }
  const path = new URL(req.url, 'http://x').pathname;
  if (path.startsWith('/__')) return control(req, res, path);

  const key = COUNTED_ROUTES[path] ?? 'other';
  if (req.headers['x-op-harness'] !== '1') {
    stats[key] += 1;
    stats.total += 1;
  }
  const fault = faults[key];
  if (fault) {
    if (fault.delay_ms) await new Promise((r) => setTimeout(r, fault.delay_ms));
    if (fault.status) {
      return sendJson(res, fault.status, { error: 'injected_fault', error_description: `test fault on ${key}` });
    }
  }
  return handler(req, res);
});
server.keepAliveTimeout = 5000;

server.on('error', (err) => {
  console.error(`OP_FAILED ${err.message}`);
  process.exit(1);
});

server.listen(config.port, config.host, () => {
  console.log(`OP_READY ${JSON.stringify({ issuer, port: config.port })}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 1000).unref();
  });
}
