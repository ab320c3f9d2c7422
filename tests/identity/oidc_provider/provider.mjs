// A certified OpenID provider (panva's oidc-provider) for the sign-in tests.
//
//   node provider.mjs CONFIG.json
//
// CONFIG (written by tests/identity/real_provider.py): issuer, port, keys (private JWKs, the
// first signs), accounts_file (JSON, id -> claims, read at each use so the tests can add
// people while it runs), client_secret (of the "uws-server" client that
// introspects), redirect_uris (of the public "portal" client, PKCE), resources (resource
// indicator -> resource server: audience, accessTokenFormat, accessTokenTTL, and
// profileInToken: whether its access tokens carry the profile claims).
// Prints "ready" on stdout once it listens on 127.0.0.1.
import { readFileSync } from 'node:fs';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const PROFILE = ['preferred_username', 'email', 'given_name', 'family_name', 'groups'];

function accounts() {
  return JSON.parse(readFileSync(config.accounts_file, 'utf8'));
}

function account(id) {
  const claims = accounts()[id];
  if (!claims) return undefined;
  return {
    accountId: id,
    // Only what the granted scopes and claims allow reaches the client (OIDC Core 5.4).
    async claims() { return { sub: id, ...claims }; },
  };
}

const provider = new Provider(config.issuer, {
  clients: [
    {
      client_id: 'portal',
      token_endpoint_auth_method: 'none',
      redirect_uris: config.redirect_uris,
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
    {
      client_id: 'uws-server',
      client_secret: config.client_secret,
      redirect_uris: [],
      grant_types: [],
      response_types: [],
    },
  ],
  jwks: { keys: config.keys },
  findAccount: async (_ctx, id) => account(id),
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'given_name', 'family_name'],
    email: ['email'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups', 'uws'],
  pkce: { required: () => true },
  ttl: {
    AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
  },
  features: {
    devInteractions: { enabled: true },
    introspection: {
      enabled: true,
      // The API server may introspect every token; nobody else may.
      allowedPolicy: async (_ctx, client) => client.clientId === 'uws-server',
    },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => undefined,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, indicator) => {
        const server = config.resources[indicator];
        if (!server) throw new errors.InvalidTarget();
        const { profileInToken, ...info } = server;
        return { scope: 'uws', jwt: { sign: { alg: 'RS256' } }, ...info };
      },
    },
  },
  extraTokenClaims: async (_ctx, token) => {
    const server = token.resourceServer && config.resources[token.resourceServer.identifier()];
    if (!server?.profileInToken) return undefined;
    const claims = accounts()[token.accountId] ?? {};
    return Object.fromEntries(PROFILE.filter((k) => k in claims).map((k) => [k, claims[k]]));
  },
});

provider.listen(config.port, '127.0.0.1', () => {
  process.stdout.write('ready\n');
});
