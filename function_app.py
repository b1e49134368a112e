"""Azure Functions entry point: creates the app and registers the trigger blueprints. Nothing else."""

import azure.functions as func

from shared.triggers.admin import bp as admin_bp
from shared.triggers.check import bp as check_bp
from shared.triggers.controller import bp as controller_bp
from shared.triggers.health import bp as health_bp
from shared.triggers.reconcile import bp as reconcile_bp
from shared.triggers.webhooks import bp as webhooks_bp

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(webhooks_bp)
app.register_functions(controller_bp)
app.register_functions(health_bp)
app.register_functions(admin_bp)
app.register_functions(reconcile_bp)
app.register_functions(check_bp)
