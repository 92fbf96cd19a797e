"""x402 payments: what Tollgate asks for (402), what it accepts (payment proofs), and how
a payment is settled and credited."""
