"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

SecAgg+ (Bell et al., CCS 2020), the sparse-graph form of SecAgg (Bonawitz et al., CCS 2017),
with SecAgg's defences against a malicious server: enrolled device keys (a PKI) and a signed
consistency round. Plain functions and two small state machines, no Flower; server/secure.py
and client/secure.py carry the messages, shared/protocol.py defines them, docs/threat-model.md
says what holds against whom.

  params       the round's parameters, their sizing, the neighbour graph, the clients' floors
  primitives   X25519, HKDF-SHA256, the AES-256-CTR mask generator, Shamir over GF(2^521 - 1),
               AES-GCM sealing, the commitment to a self-mask seed
  identity     the enrolment CA, device keys, identity records, signed views
  fixed_point  real vectors onto Z_2^32 and back; one client's contribution
  client       one client's side of a round: shares, masked input, confirm, unmask
  server       the server's side: route, sum, collect the view's signatures, unmask robustly

One round, clients numbered 1..n on a k-regular Harary graph that follows from the round id
(every client rebuilds it and checks its own neighbours):
  1 shares   each client checks its neighbours' enrolled identity records, makes a fresh mask
             key s and self-mask seed b, Shamir-shares both t-of-(k+1) among its holders, seals
             each neighbour's share under their identity keys, sends s's public key, a
             commitment to b and the sealed shares
  2 masked   it masks its quantised vector with PRG(b) and +/-PRG(s_uv) per sender
  3 confirm  it signs the server's view (alive, dropped) with its device key, once
  4 unmask   it reveals b shares of alive and s shares of dropped holders, once, only for the
             view it signed and only when t of its holders signed the same view; with distributed
             DP noise (m shares) or a floor on contributors (the co-occurrence counts), also only
             when that many alive inputs connected to it are witnessed (enrolled record + signature
             of the view, distinct devices, a random sample checked)
"""
