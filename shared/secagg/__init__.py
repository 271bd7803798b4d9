"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

SecAgg+ (Bell et al., CCS 2020), the sparse-graph form of SecAgg (Bonawitz et al., CCS 2017),
for an honest-but-curious server. Plain functions and two small state machines, no Flower;
`server/secure.py` and `client/app.py` carry the messages.

Every client has an identity key: an X25519 key pair `c` made once per run and kept in its
own state, whose public half the server registers before the client's first round and
routes to its neighbours (what a PKI does in SecAgg). It only encrypts shares in transit.

One round, clients numbered 1..n on a random k-regular graph chosen by the server:
  1 shares   client u makes a fresh X25519 key pair s (to agree masks) and a 32-byte self-mask
             seed b_u, and Shamir-shares b_u and its s private key t-of-m among its holders
             (its graph neighbours and itself). Each neighbour's shares go out under AES-GCM
             with a key from X25519 + HKDF of the two identity keys and the round id, bound to
             u's s public key, so the server, which routes them, can neither read them nor
             swap u's mask key unnoticed. u sends its s public key and the sealed shares.
  2 masked   u clips its vector, quantises it to the ring Z_2^32, adds PRG(b_u) and, for every
             neighbour v that shared keys, +PRG(s_uv) if u < v else -PRG(s_uv), where s_uv comes
             from X25519 + HKDF of the s keys. PRG = AES-256-CTR keystream.
  3 unmask   the server says who sent a masked vector (alive) and who did not (dropped). Every
             alive holder answers with its b share of each alive neighbour and its s-key share
             of each dropped one: never both for the same client.
  The server rebuilds b_u of the alive (removing self masks) and the s key of the dropped
  (removing the pairwise masks they left in their alive neighbours' vectors); the pairwise
  masks among alive clients cancel in the sum. Fewer than t shares of any needed secret:
  `RoundAborted`, and the caller leaves the model as it was.

Bonawitz et al. make c fresh each round too, which costs a message exchange per round. The
server never asks for c (it rebuilds only s and b, which stay per round), so a long-lived c
loses only forward secrecy of the sealed shares: someone who recorded them and later steals
a client's c reads that client's shares of its neighbours' secrets, one share per secret,
the same as a colluding client (docs/threat-model.md).

What the server sees: who took part in each step, public keys, ciphertexts, masked vectors
(uniform on the ring by themselves), at most one kind of secret per client, and the sum.
docs/threat-model.md says what this protects against and what it does not.
"""
