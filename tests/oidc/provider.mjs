// Starts panva's oidc-provider (an OpenID Certified implementation, from the
// npm registry) for the tests: `node provider.mjs SETTINGS.json`.
//
// This file only configures the real provider; every endpoint, the login
// form, tokens, refresh, introspection and logout are the library's own.
// SETTINGS.json (written by tests/oidc_provider.py):
//   port, clients (oidc-provider client metadata), accounts ({login: claims}),
//   ttl ({AccessToken, IdToken, RefreshToken, Session, Grant, ...} seconds),
//   idTokenClaims (true: the ID token carries the profile claims itself),
//   scopes (extra scope values clients may ask for, e.g. for client_credentials),
//   tokenClaims ({account or client id: claims} added to the access tokens it
//   issues, which introspection answers then carry, e.g. roles).
// It prints "listening on PORT" once it accepts connections. GET /_test/counts
// answers how many introspection requests it has served ({"introspection": N});
// GET /_test/delay?ms=N makes each introspection answer N ms late (a slow provider).
import { readFileSync } from "node:fs";
import Provider from "oidc-provider";

const settings = JSON.parse(readFileSync(process.argv[2], "utf8"));
const issuer = `http://127.0.0.1:${settings.port}`;
const accounts = settings.accounts || {};
const ttl = settings.ttl || {};
const tokenClaims = settings.tokenClaims || {};
const counts = { introspection: 0 };
let introspectionDelay = 0; // ms, set by GET /_test/delay?ms=N

const configuration = {
  clients: settings.clients,
  cookies: { keys: ["test-only-cookie-key-0123456789"] },
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["name", "preferred_username"],
    groups: ["groups"],
  },
  conformIdTokenClaims: !settings.idTokenClaims,
  scopes: ["openid", "offline_access", ...(settings.scopes || [])],
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true },
  // Refresh tokens for every client allowed the grant, not only with offline_access.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed("refresh_token"),
  async extraTokenClaims(ctx, token) {
    return tokenClaims[token.accountId] || tokenClaims[token.clientId];
  },
  async findAccount(ctx, sub) {
    const known = accounts[sub] || {};
    return {
      accountId: sub,
      async claims() {
        return { sub, preferred_username: sub, ...known };
      },
    };
  },
  ttl: {
    AccessToken: ttl.AccessToken || 600,
    AuthorizationCode: ttl.AuthorizationCode || 60,
    IdToken: ttl.IdToken || 600,
    RefreshToken: ttl.RefreshToken || 86400,
    ClientCredentials: ttl.ClientCredentials || 600,
    Interaction: 600,
    Session: ttl.Session || 3600,
    Grant: 86400,
  },
  renderError(ctx, out) {
    ctx.type = "json";
    ctx.body = out;
  },
};

const provider = new Provider(issuer, configuration);
provider.proxy = false;
provider.use(async (ctx, next) => {
  if (ctx.path === "/_test/counts") {
    ctx.type = "json";
    ctx.body = counts;
    return;
  }
  if (ctx.path === "/_test/delay") {
    introspectionDelay = Number(ctx.query.ms || 0);
    ctx.type = "json";
    ctx.body = { ms: introspectionDelay };
    return;
  }
  if (ctx.path === "/token/introspection") {
    counts.introspection += 1;
    if (introspectionDelay) await new Promise((r) => setTimeout(r, introspectionDelay));
  }
  await next();
});
const server = provider.listen(settings.port, "127.0.0.1", () => {
  console.log(`listening on ${settings.port}`);
});
const stop = () => server.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
