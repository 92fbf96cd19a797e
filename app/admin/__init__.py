"""The operator's API, behind ``TOLLGATE_ADMIN_TOKEN`` (without it, none of it exists).

    GET    /v1/admin/accounts                         accounts, newest first, with their money
    GET    /v1/admin/accounts/{id}                    one account, its latest payments, settlements
    PATCH  /v1/admin/accounts/{id}                    {"credit_limit_micros": N}
    POST   /v1/admin/accounts/{id}/revoke-sessions    revoke every session of the account
    GET    /v1/admin/reconciliation?format=json|csv   the reconciliation report (app.reconcile)
"""
