"""api key lifecycle: public key ids and optional expiry

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.Integer(), nullable=True))
    # Keys made before this revision get an id (as app.models.base.new_id makes them) so they can be revoked.
    connection = op.get_bind()
    for (seq,) in connection.execute(sa.text("SELECT seq FROM api_keys")).all():
        connection.execute(
            sa.text("UPDATE api_keys SET id = :id WHERE seq = :seq"),
            {"id": f"key-{secrets.token_hex(12)}", "seq": seq},
        )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.alter_column("id", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_api_keys_id"), ["id"])


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_api_keys_id"), type_="unique")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("id")
